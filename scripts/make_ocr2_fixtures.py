"""Record transformers' DeepSeek-OCR 2 outputs as small fixtures for tests/test_ocr2_parity.py.

Run in its OWN environment (the project's test extra pins transformers < 5 for the VL2 references;
DeepseekOcr2 exists only in transformers >= 5.23):

    python3 -m venv /tmp/venv-tf5
    /tmp/venv-tf5/bin/pip install torch==2.13.0 'transformers>=5.23' pillow safetensors
    /tmp/venv-tf5/bin/python scripts/make_ocr2_fixtures.py      # writes tests/fixtures/ocr2/
    flock /tmp/dsvl2-big.lock /tmp/venv-tf5/bin/python scripts/make_ocr2_fixtures.py --real   # slow test's

Model: the random official-layout checkpoint of ``tests/reference/ocr2_checkpoint.py`` loaded by
``DeepseekOcr2ForConditionalGeneration.from_pretrained`` through transformers' own key renaming
(loading must report no missing or unexpected key); its config is given explicitly, since
transformers does not read the official VL2-style config.json. Outputs in fp32: the query encoder
outputs of both view kinds, ``inputs_embeds``, logits at selected positions, 16 greedy tokens.

Processor: ``DeepseekOcr2ImageProcessorPil`` (no torchvision) at the real 1024 / 768 sizes on the
golden images and on synthetic odd sizes. Pixel tensors are stored as SHA-256 of their float32
bytes; beside transformers' global view, the global view of the official rule (Pillow's
``ImageOps.pad``, as ``process/image_process.py`` calls it) is hashed too, since the two differ in
rounding for some sizes.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from reference import ocr2_checkpoint as oc  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "ocr2"
GOLDEN = ROOT.parent / "shared" / "golden"
LOGIT_ROWS = [0, 3, 200, 700, 1130, 1200, 1380, 1381, 1382, 1383, 1384, 1385, 1386, 1387]


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def transformers_config(d: dict = oc.DIMS, image_token_id: int = oc.IMAGE_TOKEN_ID):
    """transformers' config for the checkpoint of dims ``d`` (it cannot read the official config.json)."""
    from transformers import DeepseekOcr2Config

    return DeepseekOcr2Config(
        vision_config=dict(
            sam_config=dict(hidden_size=d["sam_width"], output_channels=d["neck"], num_hidden_layers=d["sam_layers"],
                            num_attention_heads=d["sam_heads"], image_size=d["image_size"], patch_size=d["patch"],
                            window_size=d["window"], global_attn_indexes=list(d["global_layers"]),
                            downsample_channels=[d["mid"], d["dim"]]),
            encoder_config=dict(hidden_size=d["dim"], intermediate_size=d["enc_inter"], num_hidden_layers=d["enc_layers"],
                                num_attention_heads=d["enc_heads"], num_key_value_heads=d["enc_kv"], rms_norm_eps=1e-6,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                max_position_embeddings=4096)),
        text_config=dict(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["inter"],
                         moe_intermediate_size=d["moe_inter"], num_hidden_layers=d["lm_layers"],
                         num_attention_heads=d["heads"],
                         num_key_value_heads=d["heads"], n_routed_experts=d["experts"], n_shared_experts=d["shared"],
                         num_experts_per_tok=d["top_k"], topk_method="greedy", n_group=1, topk_group=1,
                         mlp_layer_types=["dense"] + ["sparse"] * (d["lm_layers"] - 1), rms_norm_eps=1e-6,
                         routed_scaling_factor=1.0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        image_token_id=image_token_id,
    )


@torch.no_grad()
def model_fixtures(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from transformers import DeepseekOcr2ForConditionalGeneration

    model, info = DeepseekOcr2ForConditionalGeneration.from_pretrained(
        ckpt, config=transformers_config(), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"transformers did not load the checkpoint cleanly: {bad}")
    model.eval()
    inp = oc.inputs()
    ids, glob, tiles = inp["input_ids"], inp["global_views"], inp["tiles"]
    vt = model.model.vision_tower
    tensors = {
        "global_query_out": vt(glob).last_hidden_state,
        "tile_query_out": vt(tiles).last_hidden_state,
    }
    feats = model.model.get_image_features(glob, tiles, [6, 0]).pooler_output
    embeds = model.model.get_input_embeddings()(ids)
    mask = (ids == oc.IMAGE_TOKEN_ID).unsqueeze(-1)
    tensors["inputs_embeds"] = embeds.masked_scatter(mask, torch.cat(feats, dim=0))
    logits = model(input_ids=ids, pixel_values=glob, pixel_values_local=tiles, num_local_patches=[6, 0]).logits
    tensors["logits_rows"] = logits[0, LOGIT_ROWS]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=glob,
                         pixel_values_local=tiles, num_local_patches=[6, 0], max_new_tokens=16, do_sample=False)
    meta = {"logit_rows": LOGIT_ROWS, "greedy_tokens": out[0, ids.shape[1]:].tolist(),
            "pixels_sha": [sha(glob), sha(tiles)]}
    return {k: v.contiguous() for k, v in tensors.items()}, meta


REAL_ROWS = list(range(0, 256, 17))  # query rows kept from each view's output (the fixture stays small)
REAL_LOGIT_ROWS = [0, 100, 548, 549, 550, 551]


@torch.no_grad()
def real_vision_fixtures(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The released vision dims in fp32 (language model cut to 2 layers): selected outputs only."""
    from transformers import DeepseekOcr2ForConditionalGeneration

    model, info = DeepseekOcr2ForConditionalGeneration.from_pretrained(
        ckpt, config=transformers_config(oc.REAL_VISION_DIMS), dtype=torch.float32, output_loading_info=True)
    if any(info.values()):
        raise SystemExit(f"transformers did not load the real-dims checkpoint cleanly: {info}")
    model.eval()
    inp = oc.real_inputs()
    ids, glob, tiles = inp["input_ids"], inp["global_views"], inp["tiles"]
    vt = model.model.vision_tower
    logits = model(input_ids=ids, pixel_values=glob, pixel_values_local=tiles, num_local_patches=[2]).logits
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=glob,
                         pixel_values_local=tiles, num_local_patches=[2], max_new_tokens=8, do_sample=False)
    tensors = {
        "global_query_rows": vt(glob).last_hidden_state[:, REAL_ROWS],
        "tile_query_rows": vt(tiles).last_hidden_state[:, [r for r in REAL_ROWS if r < 144]],
        "logits_rows": logits[0, REAL_LOGIT_ROWS, :4096],
        "last_logits_top": logits[0, -1].topk(64).values,
    }
    meta = {"query_rows": REAL_ROWS, "logit_rows": REAL_LOGIT_ROWS, "greedy_tokens": out[0, ids.shape[1]:].tolist(),
            "last_top_ids": logits[0, -1].topk(64).indices.tolist()}
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def official_global(image: Image.Image) -> torch.Tensor:
    """The official global view: ``ImageOps.pad`` to 1024 (grey 127), then (x/255 - 0.5)/0.5."""
    view = ImageOps.pad(image, (1024, 1024), color=(127, 127, 127))
    x = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return x.sub(0.5).div(0.5)


def processor_images() -> dict[str, Image.Image]:
    images = {}
    for path in sorted((GOLDEN / "images").iterdir()):
        with Image.open(path) as img:
            img.load()
            images[path.name] = img.copy()
    for w, h in oc.ODD_SIZES:
        images[f"synthetic_{w}x{h}"] = oc.synthetic_image(w, h)
    return images


def processor_fixtures() -> dict:
    from tokenizers import Tokenizer as RawTokenizer  # noqa: F401  (the fast tokenizer's backend)
    from transformers import PreTrainedTokenizerFast
    from transformers.models.deepseek_ocr2 import DeepseekOcr2ImageProcessorPil, DeepseekOcr2Processor

    tok_dir = GOLDEN / "checkpoints" / "micro-mha"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    image_processor = DeepseekOcr2ImageProcessorPil()
    processor = DeepseekOcr2Processor(image_processor=image_processor, tokenizer=tokenizer)
    cases = {}
    for name, image in processor_images().items():
        rgb = image if image.mode == "RGB" else _white_rgb(image)
        out = processor(images=[image], text="<image>\nFree OCR.", return_tensors="pt")
        local = out.get("pixel_values_local")
        ids = out["input_ids"][0].tolist()
        glob = out["pixel_values"][0]
        official = official_global(rgb)
        cases[name] = {
            "size": list(image.size), "mode": image.mode,
            "num_local_patches": int(out["num_local_patches"][0]),
            "global_sha": sha(glob), "official_global_sha": sha(official),
            "global_max_abs_diff_vs_official": float((glob - official).abs().max()),
            "local_sha": [] if local is None else [sha(t) for t in local],
            "n_image_tokens": sum(1 for i in ids if i == processor.image_token_id),
            "text_ids": [i for i in ids if i != processor.image_token_id],
        }
    return cases


def _white_rgb(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def main() -> None:
    import transformers

    OUT.mkdir(parents=True, exist_ok=True)
    if "--real" in sys.argv:  # the slow real-dims fixture (about 9 GB of disk and 5 GB of memory)
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            oc.write_sharded(Path(tmp), oc.REAL_VISION_DIMS, dtype=torch.float32)
            tensors, meta = real_vision_fixtures(Path(tmp))
        save_file(tensors, str(OUT / "real_vision_outputs.safetensors"))
        meta.update({"transformers": transformers.__version__, "torch": torch.__version__})
        (OUT / "real_vision.json").write_text(json.dumps(meta, indent=1) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        weights_sha = oc.write_checkpoint(Path(tmp))
        tensors, meta = model_fixtures(Path(tmp))
    from safetensors.torch import save_file

    save_file(tensors, str(OUT / "model_outputs.safetensors"))
    meta.update({"weights_sha256": weights_sha, "transformers": transformers.__version__, "torch": torch.__version__})
    (OUT / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    (OUT / "processor.json").write_text(json.dumps(processor_fixtures(), indent=1) + "\n")
    print(f"wrote {OUT}: {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
