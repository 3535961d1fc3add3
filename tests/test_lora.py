"""LoRA: only adapters train, PEFT key names and config, reload, merge == unmerged."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dsvl2.training.lora import apply_lora, load_adapter, merge_lora, save_adapter
from dsvl2.training.loop import additive_mask, train
from dsvl2.training.data import collate, pack

from training_helpers import make_examples, make_model, make_processor, sources, stage


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    processor = make_processor(root / "tok")
    examples = make_examples(root / "data", n_per_task=2)[:4]
    return processor, examples


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, batch.images, batch.images_seq_mask,
                     batch.images_spatial_crop, positions=batch.position_ids,
                     mask=additive_mask(batch.seq_ids, torch.float32))


def test_lora_trains_adapters_only_saves_peft_layout_and_merges(setup, tmp_path):
    processor, examples = setup
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ("attention", "experts", "projector"), r=4, alpha=8)
    rows = train(model, stage(3), sources(examples, processor), tmp_path / "run",
                 pad_id=processor.tokenizer.pad_id, progress=False)
    assert rows[-1]["loss"] < rows[0]["loss"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    for name, value in model.state_dict().items():  # base weights (parametrization originals) unchanged
        plain = name.replace(".parametrizations.", ".").replace(".original", "")
        if ".lora_" not in name:
            assert torch.equal(value, base[plain]), name

    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.language.model.layers.1.self_attn.kv_b_proj.lora_A.weight" in keys
    assert keys["base_model.model.language.model.layers.1.mlp.experts.7.down_proj.lora_B.weight"].shape == (64, 4)
    assert keys["base_model.model.language.model.layers.1.mlp.experts.0.gate_proj.lora_A.weight"].shape == (4, 64)
    assert "base_model.model.projector.layers.2.lora_B.weight" in keys
    assert not any("vision" in k for k in keys)
    import re
    pattern = re.compile(config["target_modules"])  # PEFT full-matches module names against a str pattern
    for key in keys:
        module = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        assert pattern.fullmatch(module), module
    assert not pattern.fullmatch("language.model.layers.0.mlp.gate_proj")  # dense MLP is not an expert

    src = sources(examples, processor)["demo"]
    batch = collate(pack([src[0], src[1]], 256), processor.tokenizer.pad_id)
    adapted = logits(model, batch)
    fresh = make_model()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, batch), adapted, rtol=0, atol=0)
    merged = logits(merge_lora(fresh), batch)
    assert not any(".lora_" in n for n, _ in fresh.named_parameters())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(make_model(), batch), adapted, atol=1e-4)  # the adapter did something


def test_lora_run_resumes_from_an_adapter_checkpoint(setup, tmp_path):
    processor, examples = setup
    runs = []
    for split in (False, True):
        model = make_model()
        apply_lora(model, ("attention", "vision"), r=2, alpha=2)
        out = tmp_path / f"run{split}"
        if split:
            train(model, stage(3, steps=4, checkpoint_every=2), sources(examples, processor), out,
                  pad_id=processor.tokenizer.pad_id, progress=False, stop_after=2)
            model = make_model()
            apply_lora(model, ("attention", "vision"), r=2, alpha=2)
        rows = train(model, stage(3, steps=4, checkpoint_every=2), sources(examples, processor), out,
                     pad_id=processor.tokenizer.pad_id, progress=False)
        runs.append([r["loss"] for r in rows])
    assert (tmp_path / "runTrue" / "checkpoints" / "step-00000002" / "adapter_config.json").is_file()
    assert runs[0] == runs[1]
