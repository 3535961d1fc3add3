"""``dsvl2 train`` end to end on the toy preset; export loads with dsvl2.load and gives the same logits."""

import argparse
import json
import shutil

import pytest
import torch

import dsvl2
from dsvl2.cli.train import add_train_arguments, train_main
from dsvl2.errors import InputError
from dsvl2.training.loop import additive_mask, export_model, train
from dsvl2.training.data import collate, pack

from training_helpers import make_examples, make_model, make_processor, sources, stage


def _args(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    processor = make_processor(root / "tok")
    (root / "tok" / "processor_config.json").write_text(json.dumps(
        {"candidate_resolutions": [[98, 98], [98, 196], [196, 98], [196, 196]], "patch_size": 14}))
    examples = make_examples(root / "data", n_per_task=1)
    return root, processor, examples


def test_train_command_writes_metrics_curve_and_a_loadable_model(setup, tmp_path, capsys):
    root, _, _ = setup
    data = root / "data" / "conversations.jsonl"
    bad = tmp_path / "with_bad.jsonl"
    bad.write_text(data.read_text().replace("images/", str(root / "data" / "images") + "/") + "{not json\n")
    argv = ["--stage", "3", "--preset", "toy", "--tokenizer", str(root / "tok"), "--data", str(bad),
            "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--seq-len", "256",
            "--lr", "1e-3", "--no-progress"]
    with pytest.raises(InputError, match=r"with_bad.jsonl:4: invalid JSON"):
        train_main(_args(argv))
    assert train_main(_args(argv + ["--on-bad-rows", "skip"])) == 0
    assert "with_bad.jsonl:4" in capsys.readouterr().err  # skipped rows are reported, never silent
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(k in rows[0] for k in ("loss", "lr", "tokens", "aux"))
    assert (tmp_path / "run" / "loss.png").is_file()
    pipe = dsvl2.load(tmp_path / "run" / "final", dtype="fp32", device="cpu")
    assert pipe.model.cfg.language_config.vocab_size == 384


def test_lora_command_writes_an_adapter(setup, tmp_path, monkeypatch):
    from dsvl2.training import loop

    flushing = []  # the command trains with float32 denormals flushed (denormals_flushed), then restores
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, **k: flushing.append(torch.tensor([1e-39]).item() == 0.0)
                        or real_train(*a, **k))
    root, _, _ = setup
    argv = ["--stage", "3", "--preset", "toy", "--tokenizer", str(root / "tok"),
            "--data", f"sft={root / 'data' / 'conversations.jsonl'}", "--out", str(tmp_path / "run"), "--steps", "1",
            "--batch-size", "2", "--seq-len", "256", "--lora-r", "2", "--lora-targets", "attention", "--no-progress"]
    assert train_main(_args(argv)) == 0
    assert (tmp_path / "run" / "final_adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "final").exists()
    assert flushing == [True] and torch.tensor([1e-39]).item() != 0.0


def test_export_loads_with_dsvl2_load_and_gives_the_same_logits(setup, tmp_path):
    root, processor, examples = setup
    model = make_model()
    train(model, stage(3, steps=1), sources(examples[:2], processor), tmp_path / "run",
          pad_id=processor.tokenizer.pad_id, progress=False)
    export_model(model, tmp_path / "final")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        shutil.copy(root / "tok" / name, tmp_path / "final" / name)
    pipe = dsvl2.load(tmp_path / "final", dtype="fp32", device="cpu")
    src = sources(examples[:2], pipe.processor)["demo"]
    batch = collate(pack([src[0]], 512), processor.tokenizer.pad_id)
    inputs = (batch.input_ids, batch.attention_mask, batch.images, batch.images_seq_mask, batch.images_spatial_crop)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(*inputs), model(*inputs), rtol=0, atol=0)
        mask = additive_mask(batch.seq_ids, torch.float32)
        packed = pipe.model(*inputs, positions=batch.position_ids, mask=mask, expanded=True)
        torch.testing.assert_close(packed, model(*inputs), rtol=1e-4, atol=1e-4)  # training form == inference form
