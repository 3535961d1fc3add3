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
from dsvl2.model.init import init_random_, init_weights
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
    init_weights(model, 0.02, 0, **FROM_SCRATCH[variant])
    assert digest(model) == PINS[name, variant]


@needs_pinned_randn
@pytest.mark.parametrize("name", ["demo", "toy"])
def test_fixture_init_is_pinned(name):
    model = DSVL2(configs()[name])
    init_random_(model, 3)
    assert digest(model) == PINS[name, "random"]
