"""The error policy of ``dsvl2/errors.py``: every user mistake reachable from the public entry points
raises a :class:`DSVL2Error` subclass whose message names the bad value, and every command exits 2 on
such a mistake (or a bad flag) and 1 on a runtime failure (micro-mha, fp32, CPU)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import dsvl2
from dsvl2 import cli
from dsvl2.cli import eval as eval_run
from dsvl2.cli import info as cli_info
from dsvl2.cli import train as cli_train
from dsvl2.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    DSVL2Error,
    InputError,
    TokenizerError,
    UsageError,
)
from dsvl2.model.quant import Int4Weight, Int8Weight
from dsvl2.processing import grounding, layout, tiling
from dsvl2.serving.protocol import APIError, ChatRequest


@pytest.fixture(scope="module")
def micro(golden_dir: Path) -> Path:
    return golden_dir / "checkpoints" / "micro-mha"


@pytest.fixture(scope="module")
def pipe(micro: Path) -> dsvl2.Pipeline:
    return dsvl2.load(micro, dtype="fp32", device="cpu")


def raises(cls: type[DSVL2Error], named: str, call: Callable[[], Any]) -> DSVL2Error:
    """``call()`` raises exactly a ``cls`` (a DSVL2Error) whose message contains ``named``."""
    assert issubclass(cls, DSVL2Error)
    with pytest.raises(DSVL2Error) as info:
        call()
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert named in str(info.value), str(info.value)
    return info.value


# ---- dsvl2.load / Processor -------------------------------------------------------------------------
def test_load_names_the_bad_directory_dtype_quantize_and_device(micro: Path, tmp_path: Path) -> None:
    raises(CheckpointError, str(tmp_path / "nope"), lambda: dsvl2.load(tmp_path / "nope", "fp32", "cpu"))
    raises(CheckpointError, "config.json", lambda: dsvl2.load(micro / "config.json", "fp32", "cpu"))
    raises(ConfigError, str(tmp_path / "config.json"), lambda: dsvl2.load(tmp_path, "fp32", "cpu"))
    raises(InputError, "'fp13'", lambda: dsvl2.load(micro, dtype="fp13", device="cpu"))
    raises(InputError, "'int3'", lambda: dsvl2.load(micro, dtype="fp32", device="cpu", quantize="int3"))
    raises(InputError, "'tpu'", lambda: dsvl2.load(micro, dtype="fp32", device="tpu"))
    if not torch.cuda.is_available():  # torch asserts here; dsvl2 names the device instead
        raises(InputError, "'cuda'", lambda: dsvl2.load(micro, dtype="fp32", device="cuda"))
    raises(TokenizerError, "tokenizer.json", lambda: dsvl2.Processor.from_pretrained(tmp_path))


# ---- Pipeline.chat / complete / stream / ground -------------------------------------------------------
def test_bad_images_name_the_image(pipe: dsvl2.Pipeline, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    raises(InputError, "none.png", lambda: pipe.chat("<image>\nhi", [tmp_path / "none.png"], max_new_tokens=1))
    raises(InputError, "corrupt.png", lambda: pipe.chat("<image>\nhi", [corrupt], max_new_tokens=1))
    raises(InputError, "int", lambda: pipe.chat("<image>\nhi", [123], max_new_tokens=1))
    raises(InputError, "0x5", lambda: pipe.chat("hi", [Image.new("RGB", (0, 5))], max_new_tokens=1))
    raises(InputError, "5000x1", lambda: pipe.chat("hi", [Image.new("RGB", (5000, 1))], max_new_tokens=1))
    raises(InputError, "2 <image> placeholders but 1", lambda: pipe.chat(
        "<image><image>\nhi", [Image.new("RGB", (8, 8))], max_new_tokens=1))
    raises(InputError, "none.png", lambda: pipe.ground(tmp_path / "none.png", "the dog", max_new_tokens=1))


def test_bad_messages_budgets_and_truncation_name_the_value(pipe: dsvl2.Pipeline) -> None:
    image = Image.new("RGB", (64, 48), "red")
    raises(InputError, "5", lambda: pipe.chat(5, max_new_tokens=1))
    raises(InputError, "messages is empty", lambda: pipe.chat([], max_new_tokens=1))
    raises(InputError, "'robot'", lambda: pipe.chat([{"role": "robot", "content": "x"}], max_new_tokens=1))
    raises(InputError, "int", lambda: pipe.chat([{"role": "user", "content": 7}], max_new_tokens=1))
    raises(InputError, "image_token_budget 0", lambda: pipe.chat("hi", [image], image_token_budget=0))
    raises(InputError, "'many'", lambda: pipe.chat("hi", [image], image_token_budget="many"))
    raises(InputError, "'newest'", lambda: pipe.chat("hi", truncate="newest", max_new_tokens=1))
    raises(ContextLengthError, "4096", lambda: pipe.chat("hi " * 5000, max_new_tokens=1))
    raises(InputError, "non-empty list", lambda: pipe.complete_batch([], max_new_tokens=1))


@pytest.mark.parametrize(("setting", "named"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": "ten"}, "'ten'"),
    ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    ({"temperature": "hot"}, "'hot'"),
    ({"temperature": 1.0, "top_p": 0.0}, "got 0.0"),
    ({"top_k": -1}, "top_k must be >= 0, got -1"),
    ({"repetition_penalty": 0.0}, "got 0.0"),
    ({"chunk_size": 0}, "chunk_size must be >= 1, got 0"),
    ({"seed": 1.5}, "1.5"),
    ({"temperature": 1.0, "seed": 2**70}, f"seed must fit in a signed 64-bit integer, got {2**70}"),
    ({"no_repeat_ngram": -1}, "got -1"),
    ({"temprature": 0.5}, "'temprature'"),
])
def test_bad_generation_settings_name_the_setting(pipe: dsvl2.Pipeline, setting: dict[str, Any],
                                                  named: str) -> None:
    gen = {"max_new_tokens": 1, **setting}
    raises(InputError, named, lambda: pipe.chat("hi", **gen))
    raises(InputError, named, lambda: list(pipe.stream("hi", **gen)))


def test_image_crops_that_do_not_fit_the_tiles(pipe: dsvl2.Pipeline) -> None:
    batch = pipe.processor([{"role": "user", "content": "<image>\nhi", "images": [Image.new("RGB", (64, 48))]}])
    crop = batch.images_spatial_crop.clone()
    crop[0, 0] = torch.tensor([3, 2])  # 1 + 6 tiles, but the batch holds 2
    raises(InputError, "[(3, 2)] needs 7 tiles", lambda: pipe.model.prepare_inputs_embeds(
        batch.input_ids, batch.images, batch.images_seq_mask, crop))


# ---- processing: tiling, layout, grounding ------------------------------------------------------------
def test_tiling_and_layout_name_the_sizes() -> None:
    image = Image.new("RGB", (64, 48))
    raises(InputError, "0x5", lambda: tiling.select_best_resolution((0, 5), [(384, 384)]))
    raises(ConfigError, "candidate_resolutions", lambda: tiling.select_best_resolution((5, 5), []))
    raises(ConfigError, "400x384", lambda: tiling.tile_image(image, [(384, 384)], 384, True, resolution=(400, 384)))
    raises(InputError, "got 0", lambda: tiling.normalize([]))
    raises(InputError, "nw=0", lambda: layout.num_image_tokens(0, 1, 14))
    raises(ConfigError, "patch_size=0", lambda: layout.tile_grid(384, 0, 2))


def test_grounding_format_names_the_bad_box() -> None:
    assert grounding.format_det("a", [(0, 5, 999, 7)]) == "<|ref|>a<|/ref|><|det|>[[0, 5, 999, 7]]<|/det|>"
    raises(InputError, "(1, 2, 3)", lambda: grounding.format_det("a", [(1, 2, 3)]))
    raises(InputError, "('x', 2, 3, 4)", lambda: grounding.format_det("a", [("x", 2, 3, 4)]))
    raises(InputError, "1500", lambda: grounding.format_det("a", [(1, 2, 3, 1500)]))
    raises(InputError, "-1", lambda: grounding.format_det("a", [(-1, 2, 3, 4)]))
    # parsing never raises: a malformed answer is reported in .errors, naming the span
    parsed = grounding.parse_grounding("<|ref|>a<|/ref|><|det|>[[1, 2, 3]]<|/det|>")
    assert parsed.boxes == [] and parsed.errors and "[1, 2, 3]" in " ".join(parsed.errors)


def test_quantized_weight_misuse_is_a_usage_error() -> None:
    for cls, mode in ((Int8Weight, "int8"), (Int4Weight, "int4")):
        weight = cls(torch.Size([2, 2]), torch.float32, torch.device("cpu"))
        err = raises(UsageError, f"{mode}-quantized", lambda: weight + 1)  # noqa: B023
        assert isinstance(err, RuntimeError)  # what torch code around it expects


# ---- server request parsing --------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "param", "status"), [
    ([], None, 422),
    ({"messages": "x"}, "messages", 422),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 7}, "temperature", 400),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": "high"}, "top_p", 422),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", 400),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": -3}, "top_k", 400),
    ({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}, "repetition_penalty", 400),
    ({"messages": [{"role": "user", "content": "x"}], "truncate": "newest"}, "truncate", 400),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n", 400),
])
def test_request_parsing_names_the_field(body: Any, param: str | None, status: int) -> None:
    err = raises(APIError, param or "JSON object", lambda: ChatRequest.from_json(body))
    assert (err.status, err.param) == (status, param)


def test_request_sampling_errors_are_the_sampling_params_rule() -> None:
    err = raises(APIError, "got -3", lambda: ChatRequest.from_json({"messages": [{"role": "user", "content": "x"}],
                                                                   "top_k": -3}))
    assert (err.param, err.code, err.message) == ("top_k", "invalid_value", "top_k must be >= 0, got -3")
    raises(InputError, "top_k must be >= 0, got -3", lambda: dsvl2.GenerateArgs(top_k=-3))


# ---- exit status of the commands ---------------------------------------------------------------------
def test_commands_exit_2_on_input_errors_and_1_on_runtime_failures(tmp_path: Path, capsys, monkeypatch) -> None:
    assert cli.main(["chat", "--model", str(tmp_path / "nope"), "--device", "cpu", "hi"]) == EXIT_USAGE
    assert "nope" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "chartqa", "--data", str(tmp_path / "missing.tsv"), "--out",
                     str(tmp_path / "o"), "--no-progress"]) == EXIT_USAGE
    assert "missing.tsv" in capsys.readouterr().err
    assert eval_run.main(["--task", "chartqa", "--data", str(tmp_path / "missing.tsv"), "--out",
                          str(tmp_path / "o"), "--no-progress"]) == EXIT_USAGE
    assert cli_train.main(["--stage", "3", "--preset", "toy", "--config", str(tmp_path / "nope.toml"), "--out",
                           str(tmp_path / "t")]) == EXIT_USAGE
    assert "nope.toml" in capsys.readouterr().err
    for argv in (["info", "--dtype", "fp13"], ["train"], ["no-such-command"]):  # argparse: usage errors
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == EXIT_USAGE
    capsys.readouterr()

    def disk_full(args: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli_info, "info_main", disk_full)
    assert cli.main(["info", "--preset", "toy"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" in err
    assert "exit status:" in cli.build_parser().format_help()


def test_the_installed_command_exits_2_in_a_real_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dsvl2.cli", "ground", "--model", str(tmp_path / "nope"),
                           "--image", str(tmp_path / "none.png"), "the dog"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == EXIT_USAGE and "none.png" in done.stderr, done.stderr
