"""DeepSeek-OCR 2 config: the released file's schema, explicit defaults, and errors that name the key."""

from __future__ import annotations

import json

import pytest
import torch

from dsvl2.config import DSVL2Config
from dsvl2.config_ocr2 import OCR2_PRESETS, OCR2Config, read_config
from dsvl2.errors import CheckpointError, ConfigError

# The released config.json's structure (values as published; the language keys repeated at the top level).
RELEASED = {
    "architectures": ["DeepseekOCR2ForCausalLM"], "model_type": "deepseek_vl_v2",
    "candidate_resolutions": [[1024, 1024]], "global_view_pos": "head", "tile_tag": "2D",
    "hidden_size": 1280, "num_hidden_layers": 12, "n_routed_experts": 64, "vocab_size": 129280,
    "language_config": {
        "vocab_size": 129280, "hidden_size": 1280, "intermediate_size": 6848, "moe_intermediate_size": 896,
        "num_hidden_layers": 12, "num_attention_heads": 10, "num_key_value_heads": 10, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "use_mla": False, "kv_lora_rank": None,
        "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 0,
        "max_position_embeddings": 8192, "bos_token_id": 0, "eos_token_id": 1, "lm_head": True, "rm_head": False,
    },
    "vision_config": {
        "image_size": 1024, "mlp_ratio": 3.7362, "model_name": "deepencoderv2", "model_type": "vision",
        "width": {"sam_vit_b": {"width": 768, "layers": 12, "heads": 12, "global_attn_indexes": [2, 5, 8, 11],
                                "downsample_channels": [512, 1024]},
                  "qwen2-0-5b": {"dim": 896}},
    },
    "projector_config": {"input_dim": 896, "n_embed": 1280, "projector_type": "linear", "model_type": "mlp_projector"},
}


def write(tmp_path, data):
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_released_config_reads_with_the_hard_coded_dims(tmp_path):
    cfg = read_config(write(tmp_path, RELEASED))
    assert isinstance(cfg, OCR2Config) and cfg == OCR2_PRESETS["ocr2"]
    v = cfg.vision_config
    assert (v.image_size, v.tile_size, v.sam.patch_size, v.sam.window_size, v.sam.neck_channels) == (1024, 768, 16, 14, 256)
    assert (v.encoder.layers, v.encoder.heads, v.encoder.kv_heads, v.encoder.intermediate_size) == (24, 14, 2, 4864)
    assert (v.global_grid, v.local_grid, v.global_queries, v.local_queries) == (16, 12, 256, 144)


def test_a_vl2_config_still_reads_as_vl2(golden_dir):
    assert isinstance(read_config(golden_dir / "checkpoints" / "micro-mha"), DSVL2Config)


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.update(hidden_size=2048), "hidden_size"),
    (lambda d: d["vision_config"]["width"]["sam_vit_b"].update(heads=7), "heads"),
    (lambda d: d["vision_config"]["width"]["qwen2-0-5b"].update(dims=896), "dims"),
    (lambda d: d["projector_config"].update(input_dim=1024), "input_dim"),
    (lambda d: d["projector_config"].update(projector_type="mlp_gelu"), "projector_type"),
    (lambda d: d["vision_config"]["width"].pop("qwen2-0-5b"), "qwen2-0-5b"),
])
def test_bad_configs_name_the_key(tmp_path, edit, named):
    data = json.loads(json.dumps(RELEASED))
    edit(data)
    with pytest.raises(ConfigError, match=named):
        read_config(write(tmp_path, data))


def test_config_round_trips_through_to_dict(tmp_path):
    cfg = OCR2_PRESETS["ocr2"]
    cfg.save(tmp_path)
    assert read_config(tmp_path) == cfg


def test_checkpoint_with_a_wrong_shape_names_key_and_shapes(tmp_path):
    from reference import ocr2_checkpoint as oc
    from safetensors.torch import load_file, save_file

    from dsvl2.checkpoint import load_model

    oc.write_checkpoint(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.qwen2_model.query_768.weight"] = torch.zeros(143, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"query_768.*\[143, 32\].*\[144, 32\]"):
        load_model(tmp_path, dtype=torch.float32)


def test_default_encoders_have_the_published_parameter_counts():
    """SAM ViT-B's image encoder (89,670,912 parameters, neck included) and Qwen2-0.5B without its
    embedding table (494,032,768 - 151,936 x 896 = 357,898,112): the dims hard-coded officially."""
    from dsvl2.config_ocr2 import OCR2VisionConfig
    from dsvl2.model.ocr2_vision import build_encoders

    with torch.device("meta"):
        sam, enc = build_encoders(OCR2VisionConfig())

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    assert count(sam) - count(sam.net_2, sam.net_3) == 89_670_912
    assert count(enc) - count(enc.query_768, enc.query_1024) == 357_898_112
    assert (enc.query_1024.num_embeddings, enc.query_768.num_embeddings) == (256, 144)


def test_info_reports_an_ocr2_directory(tmp_path, capsys):
    from dsvl2.cli import main

    assert main(["info", "--model", str(write(tmp_path, RELEASED)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tile"] == 1024 and info["layers"] == 12 and info["attention"] == "MHA"
