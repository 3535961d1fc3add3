"""The random-init rule of ``dsvl2.model.init``: its numbers are pinned, its options checked.

The pins are sha256 digests of every parameter's fp32 bytes (in ``named_parameters`` order) after the
init, recorded before the three init rules became one: the from-scratch recipe must stay bit-identical
(the shipped demo model was trained from it and ``python -m dsvl2.demo.build`` must reproduce it), and
the test/fixture recipe too (``tests/toy.py``, ``bench/decode.py`` and ``bench/make_checkpoint.py`` draw
from it). torch's normal sampler rounds differently on CPUs without AVX2 (its scalar Box-Muller), so
the pins are checked only where ``torch.randn`` draws the numbers they were recorded with.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from dsvl2.config import DSVL2Config
from dsvl2.model.init import FIXTURE_INIT, init_params_
from dsvl2.model.vlm import DSVL2
from toy import toy_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "dsvl2" / "demo" / "model" / "config.json"
# torch.randn(64, generator=seed 0) on the CPUs the pins were recorded on (AVX2 and AVX512 kernels agree)
RANDN_PIN = "e1275a785936ab2f402174ff3c60fb3b7367f0d6ee9dfce7a6ea1f8d41520484"


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def configs() -> dict[str, DSVL2Config]:
    """The shipped demo model's config, and the toy with a noaux router (a correction bias) and 1024 tokens."""
    toy = toy_config("noaux")
    toy = dataclasses.replace(toy, language_config=dataclasses.replace(toy.language_config, vocab_size=1024))
    return {"demo": DSVL2Config.from_hf_json(DEMO_CONFIG), "toy": toy}


needs_pinned_randn = pytest.mark.skipif(
    hashlib.sha256(torch.randn(64, generator=torch.Generator().manual_seed(0)).numpy().tobytes()).hexdigest()
    != RANDN_PIN, reason="this CPU's torch.randn draws other numbers than those the pins were recorded with")

FROM_SCRATCH = {"default": {}, "sincos": dict(pos_init="sincos", pos_scale=0.5),
                "mimetic": dict(pos_init="sincos", attn_init="mimetic")}
PINS = {
    ("demo", "default"): "4d87b908bb10b4036f8d17188932fce810d6d0dced308e3d087167b8b70c5166",
    ("demo", "sincos"): "b14a642701491d47b700a62ae3883b819cc5853a681cf0093f645ee7d5202b2b",  # the shipped recipe
    ("demo", "mimetic"): "371ec37b4ac8688ab9d959b41aac421be0ec5aa20a578a5ef8c341e7ae99f19c",
    ("demo", "random"): "c5d423168d2e22817d49704ea0f49d7c807ce6aaec03d09e42c5a8d0171d301c",
    ("toy", "default"): "330de9dd8b5b1929ea51162a207bb9fd7b5e6b6c89b96e20653f8356f9c99aba",
    ("toy", "sincos"): "0841c4205182e271d646d690c78b043a3c0448b2f151cde5c71dd18f1441267e",
    ("toy", "mimetic"): "e06cefc964c86416020363dc893a44e537db813f5787120420a22c0cb34bcb82",
    ("toy", "random"): "deac7837f45977d5c98620c4dd1bb83980b3c068683c9e3798c46ff5d9e760bb",
}


@needs_pinned_randn
@pytest.mark.parametrize("name", ["demo", "toy"])
@pytest.mark.parametrize("variant", sorted(FROM_SCRATCH))
def test_from_scratch_init_is_pinned(name, variant):
    model = DSVL2(configs()[name])
    init_params_(model, 0, std=0.02, **FROM_SCRATCH[variant])
    assert digest(model) == PINS[name, variant]


@needs_pinned_randn
@pytest.mark.parametrize("name", ["demo", "toy"])
def test_fixture_init_is_pinned(name):
    model = DSVL2(configs()[name])
    init_params_(model, 3, **FIXTURE_INIT)
    assert digest(model) == PINS[name, "random"]


def test_each_class_gets_the_standard_deviation_of_the_table():
    """The docstring's table, measured: per class the sample std (and the norm weights' mean) of the draws."""
    cfg = configs()["toy"]
    lc = cfg.language_config
    model = init_params_(DSVL2(cfg), 0, **FIXTURE_INIT, router_gain=4.0)
    p = dict(model.named_parameters())
    layer = "language.model.layers.1."
    norm = p["language.model.layers.0.input_layernorm.weight"]
    assert abs(norm.mean() - 1) < 0.05 and abs(norm.std() - 0.1) < 0.03
    expected = {  # name: std of the table under std="fan_in"
        "vision.blocks.0.attn.qkv.bias": 0.02,
        layer + "mlp.gate.e_score_correction_bias": 0.1,
        "language.model.embed_tokens.weight": 1.0,
        "image_newline": lc.hidden_size ** -0.5,
        "vision.pos_embed": 0.5,
        layer + "mlp.gate.weight": 4.0 / lc.hidden_size ** 0.5,
        "language.model.layers.0.self_attn.q_proj.weight": 2.0 / lc.hidden_size ** 0.5,
        "vision.blocks.0.attn.qkv.weight": 2.0 / cfg.vision_config.width ** 0.5,
        "language.lm_head.weight": 1.0 / lc.hidden_size ** 0.5,
        layer + "mlp.experts.down_proj": 1.0 / lc.moe_intermediate_size ** 0.5,
        "vision.patch_embed.proj.weight": 1.0 / (3 * 14 * 14) ** 0.5,
    }
    for name, std in expected.items():
        assert abs(p[name].std() / std - 1) < 0.3, name  # 8 to 8M samples: well inside 30 %

    model = init_params_(DSVL2(cfg), 0, std=0.05)  # a number: norms exactly 1, biases exactly 0, the rest N(0, s)
    p = dict(model.named_parameters())
    assert torch.equal(p["vision.norm.weight"], torch.ones(cfg.vision_config.width))
    assert not p["vision.norm.bias"].any() and not p["vision.blocks.0.attn.qkv.bias"].any()
    assert not p[layer + "mlp.gate.e_score_correction_bias"].any()
    for name in ("language.model.embed_tokens.weight", "vision.pos_embed", layer + "mlp.gate.weight",
                 "vision.blocks.0.attn.qkv.weight", "language.lm_head.weight"):
        assert abs(p[name].std() / 0.05 - 1) < 0.3, name


def test_bad_init_values_are_named():
    from dsvl2.errors import ConfigError
    from dsvl2.model.init import sincos_2d

    with pytest.raises(ConfigError, match="width 30 is not divisible by 4"):
        sincos_2d(4, 30)
    model = DSVL2(configs()["toy"])
    for bad in (0.0, -0.02, "xavier"):
        with pytest.raises(ConfigError, match=f"init std = {bad!r}"):
            init_params_(model, 0, std=bad)
