"""``dsvl2 train``: one stage of training from a recipe, on JSONL conversation files (examples below).

The stage's settings come from ``--config`` (a recipe TOML, ``[stageN]`` table; the paper's defaults
when absent) and single flags override them. ``--data NAME=PATH`` (repeatable) gives the JSONL file of
each mixture source; a bare ``PATH`` serves a one-source mixture. Bad rows stop the run with their
``file:line`` unless ``--on-bad-rows skip``, which reports every skipped row. Outputs in ``--out``:
``metrics.jsonl``, ``loss.png``, ``checkpoints/`` (resumed automatically) and ``final/`` (the Hugging
Face layout with tokenizer and processor files, or ``final_adapter/`` for LoRA runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
from pathlib import Path

from . import set_examples

EXAMPLES = (
    "dsvl2 train --stage 3 --config dsvl2/training/recipes/paper.toml --model path/to/model --data sft=train.jsonl "
    "--out runs/sft",
    "dsvl2 train --stage 3 --preset toy --tokenizer TOKDIR --data conversations.jsonl --out /tmp/run --steps 3",
    "torchrun --nproc-per-node 2 -m dsvl2.cli train ...      # several processes, FSDP2",
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``dsvl2 train``."""
    set_examples(parser, EXAMPLES)
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), required=True,
                        help="1 align (ViT + projector), 2 pretrain (all), 3 sft (all, answers only)")
    parser.add_argument("--config", type=Path, default=None, help="recipe TOML with a [stageN] table")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                        help="JSONL conversations of a mixture source (repeatable); a bare PATH for one source")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", type=Path, help="start from this model directory (official HF layout)")
    group.add_argument("--preset", help="start from random weights of a preset (e.g. toy); needs --tokenizer")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="directory with tokenizer.json (+ processor_config.json); default: the model's")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, logs, final weights)")
    parser.add_argument("--steps", type=int, help="override the stage's steps")
    parser.add_argument("--lr", type=float, help="override the base learning rate")
    parser.add_argument("--batch-size", type=int, help="samples per step over all processes")
    parser.add_argument("--seq-len", type=int, help="packed row length")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank instead")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    parser.add_argument("--lora-targets", default="attention,experts,projector",
                        help="comma list of attention, experts, projector, vision")
    parser.add_argument("--merge-lora", action="store_true", help="also export the merged model to final/")
    parser.add_argument("--on-bad-rows", choices=("raise", "skip"), default="raise")
    parser.add_argument("--workers", type=int, default=0, help="background batch builders")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    parser.add_argument("--no-fsdp", action="store_true", help="replicate parameters across processes (DDP-style)")
    parser.add_argument("--no-progress", action="store_true")


def _stage(args: argparse.Namespace):
    from dsvl2.training.stages import default_stage, load_recipe

    recipe = load_recipe(args.config) if args.config else {"sources": {}, "stages": {}}
    stage = recipe["stages"].get(args.stage) or default_stage(args.stage)
    overrides = {k: v for k, v in {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                                   "seq_len": args.seq_len, "checkpoint_every": args.checkpoint_every,
                                   "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}.items()
                 if v is not None}
    if "steps" in overrides and stage.warmup_steps > overrides["steps"]:
        overrides["warmup_steps"] = overrides["steps"]
    return dataclasses.replace(stage, **overrides), recipe["sources"]


def _data_paths(args: argparse.Namespace, stage, recipe_sources: dict[str, str]) -> dict[str, str]:
    from dsvl2.errors import InputError

    paths = dict(recipe_sources)
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep:
            if len(stage.mixture) != 1:
                raise InputError(f"--data {item}: the stage mixes {sorted(stage.mixture)}; write NAME=PATH")
            name, path = next(iter(stage.mixture)), item
        paths[name] = path
    missing = sorted(set(stage.mixture) - set(paths))
    if missing:
        raise InputError(f"no data for mixture source(s) {missing}; pass --data NAME=PATH")
    return paths


def train_main(args: argparse.Namespace) -> int:
    """Run ``dsvl2 train``; returns the exit status."""
    from dsvl2.training.loop import denormals_flushed

    with denormals_flushed():  # before torch starts its threads, so that they inherit the mode
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    from dsvl2.checkpoint import load_model
    from dsvl2.config import PRESETS
    from dsvl2.errors import InputError
    from dsvl2.model.vlm import DSVL2
    from dsvl2.processing.processor import Processor
    from dsvl2.training import distributed as D
    from dsvl2.training.data import ConversationDataset, load_jsonl
    from dsvl2.training.lora import apply_lora, merge_lora, save_adapter
    from dsvl2.training.loop import export_model, train

    if args.threads:
        torch.set_num_threads(args.threads)
    stage, recipe_sources = _stage(args)
    env = D.init_from_env(fsdp=not args.no_fsdp)
    tok_dir = args.tokenizer or args.model
    if tok_dir is None:
        raise InputError("--preset needs --tokenizer DIR (tokenizer.json and processor_config.json)")
    processor = Processor.from_pretrained(tok_dir)
    if args.model is not None:
        model = load_model(args.model, dtype=torch.float32)
    else:
        if args.preset not in PRESETS:
            raise InputError(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
        from dsvl2.model.init import init_params_

        cfg = PRESETS[args.preset]
        tok = processor.tokenizer
        vocab = math.ceil(tok.vocab_size / 64) * 64  # a fresh model gets the tokenizer's vocabulary
        cfg = dataclasses.replace(cfg, language_config=dataclasses.replace(
            cfg.language_config, vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
        torch.manual_seed(stage.seed)
        model = DSVL2(cfg)
        init_params_(model, stage.seed, std=0.02)
    if args.lora_r:
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        apply_lora(model, targets, args.lora_r, args.lora_alpha or 2.0 * args.lora_r)
    device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    model = D.shard_model(model.to(device), env)

    sources = {}
    for name, path in _data_paths(args, stage, recipe_sources).items():
        if name not in stage.mixture:
            continue
        examples, bad = load_jsonl(path, on_error=args.on_bad_rows)
        for row in bad:
            print(f"skipped bad row {row}", file=sys.stderr)
        if bad:
            print(f"{path}: skipped {len(bad)} bad row(s), kept {len(examples)}", file=sys.stderr)
        if not examples:
            raise InputError(f"{path}: no usable rows")
        sources[name] = ConversationDataset(examples, processor, mask_prompt=stage.mask_prompt)

    train(model, stage, sources, args.out, pad_id=processor.tokenizer.pad_id, env=env, resume=not args.no_resume,
          workers=args.workers, progress=not args.no_progress, device=device)
    if args.lora_r:
        if env.is_main:
            save_adapter(model, args.out / "final_adapter")
        if not args.merge_lora:
            return 0
        merge_lora(model)
    export_model(model, args.out / "final", env=env)
    if env.is_main:
        for name in TOKENIZER_FILES:
            if (Path(tok_dir) / name).is_file():
                shutil.copy(Path(tok_dir) / name, args.out / "final" / name)
        print(f"wrote {args.out / 'final'} (metrics: {args.out / 'metrics.jsonl'}, curve: {args.out / 'loss.png'})",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``dsvl2 train`` with these arguments (the one ``dsvl2`` main)."""
    from . import main as dsvl2_main

    return dsvl2_main(["train", *(sys.argv[1:] if argv is None else argv)])
