"""Strict loading, saving and the config schema: round trips and errors that name the problem."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file

from dsvl2.checkpoint import iter_official_tensors, load_model, save_model, write_safetensors
from dsvl2.config import PRESETS, DSVL2Config
from dsvl2.errors import CheckpointError, ConfigError
from toy import toy_model


@pytest.fixture()
def saved(tmp_path):
    model = toy_model("noaux", seed=3, dtype=torch.bfloat16)
    model.unused_checkpoint_tensors = {"vision.attn_pool.latent": torch.randn(1, 1, 32).bfloat16()}
    save_model(model, tmp_path / "ckpt", max_shard_bytes=4_000_000)  # several shards + index
    return model, tmp_path / "ckpt"


def test_save_load_round_trip_is_bit_exact(saved):
    model, path = saved
    assert len(list(path.glob("model-*.safetensors"))) > 1
    loaded = load_model(path, dtype=torch.bfloat16)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(loaded.unused_checkpoint_tensors["vision.attn_pool.latent"],
                       model.unused_checkpoint_tensors["vision.attn_pool.latent"])


def test_saved_files_use_official_keys_and_are_readable_by_safetensors(saved):
    model, path = saved
    index = json.loads((path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "view_seperator" in keys and "view_separator" not in keys
    assert "language.model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert "language.model.layers.1.mlp.gate.e_score_correction_bias" in keys
    seen = {}
    for shard in set(index["weight_map"].values()):
        seen.update(load_file(str(path / shard)))
    assert seen.keys() == keys
    ours = dict(iter_official_tensors(model))
    for k, t in ours.items():
        assert torch.equal(seen[k], t), k


def test_load_in_another_dtype(saved):
    model, path = saved
    loaded = load_model(path, dtype=torch.float32)
    w = loaded.language.lm_head.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, model.language.lm_head.weight.float())


def _rewrite_shard(path, edit):
    shard = sorted(path.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    edit(tensors)
    write_safetensors(shard, tensors)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))
    return shard


def test_missing_weight_is_named(saved):
    _, path = saved
    shard = _rewrite_shard(path, lambda t: t.pop(next(iter(t))))
    with pytest.raises(CheckpointError, match="missing weight"):
        load_model(path)
    assert shard.exists()


def test_unexpected_weight_is_named(saved):
    _, path = saved
    _rewrite_shard(path, lambda t: t.__setitem__("language.model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected weight.*language.model.extra.weight"):
        load_model(path)


def test_misshaped_weight_names_key_and_both_shapes(saved):
    _, path = saved

    def edit(t):
        assert "image_newline" in t
        t["image_newline"] = torch.zeros(7, 3, dtype=torch.bfloat16)

    _rewrite_shard(path, edit)
    with pytest.raises(CheckpointError, match=r"'image_newline' has shape \[7, 3\].*needs \[64\]"):
        load_model(path)


def test_truncated_shard_and_missing_files(saved, tmp_path):
    _, path = saved
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|past the end"):
        load_model(path)
    shard.unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(path / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(empty)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    (empty / "model.safetensors").write_bytes(bad.read_bytes())
    with pytest.raises(CheckpointError, match="cannot read safetensors header"):
        load_model(empty)


def test_config_unknown_key_and_defaults(golden_dir, tmp_path):
    data = json.loads((golden_dir / "checkpoints" / "micro-mla" / "config.json").read_text())
    data["language_config"]["num_hiden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="num_hiden_layers"):
        DSVL2Config.from_hf_json(tmp_path)
    # Sparse released files: omitted language keys take DeepSeek's bundled defaults (spec §1.4).
    sparse = {k: v for k, v in PRESETS["small"].to_dict().items()}
    sparse["language_config"] = {"hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                                 "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
                                 "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
                                 "first_k_dense_replace": 1, "topk_method": "greedy", "q_lora_rank": None,
                                 "n_group": 1, "topk_group": 1, "max_position_embeddings": 4096, "lm_head": True}
    cfg = DSVL2Config.from_dict(sparse)
    lc = cfg.language_config
    assert (lc.vocab_size, lc.use_mla, lc.kv_lora_rank, lc.qk_rope_head_dim, lc.v_head_dim) == (102400, True, 512, 64, 128)
    assert cfg == PRESETS["small"]
    with pytest.raises(ConfigError, match="config file not found"):
        DSVL2Config.from_hf_json(tmp_path / "missing")
    data = json.loads((golden_dir / "checkpoints" / "micro-mla" / "config.json").read_text())
    del data["tile_tag"]
    with pytest.raises(ConfigError, match="tile_tag"):
        DSVL2Config.from_dict(data)


def test_config_round_trip_and_presets(tmp_path, golden_dir):
    for name in ("tiny", "small", "base", "toy"):
        cfg = PRESETS[name]
        cfg.save(tmp_path)
        assert DSVL2Config.from_hf_json(tmp_path) == cfg
    golden = DSVL2Config.from_hf_json(golden_dir / "checkpoints" / "micro-mla-noaux")
    assert golden.language_config.topk_method == "noaux_tc" and golden.grid == 14
