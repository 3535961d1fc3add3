"""``dsvl2`` command line: chat | ground | serve | info | eval | train | ocr.

Each subcommand parses flags and calls a library function a user could call directly. Heavy
subsystems (server, training, evaluation) are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import EXIT_FAILURE, EXIT_HELP, EXIT_USAGE, run_command

EXAMPLES = {
    "chat": "dsvl2 chat --image photo.png \"What is in this picture?\"      # shipped demo model\n"
            "  dsvl2 chat --model ./deepseek-vl2-tiny --image a.png --image b.png \"Compare them.\"\n"
            "  dsvl2 chat --model ./deepseek-vl2-tiny                        # interactive, multi-turn",
    "ground": "dsvl2 ground --image shapes.png \"the red circle\" -o boxes.png",
    "serve": "dsvl2 serve --model ./deepseek-vl2-tiny --port 8000   # OpenAI API + web chat on 127.0.0.1",
    "info": "dsvl2 info --model ./deepseek-vl2-tiny     # or: dsvl2 info --preset small",
    "eval": "dsvl2 eval --task demo --data demo_eval/data.jsonl --out runs/eval-demo",
    "train": "dsvl2 train --stage 3 --config recipe.toml --data train.jsonl --out runs/sft",
    "ocr": "dsvl2 ocr --model ./DeepSeek-OCR-2 paper.pdf scan.png -o out/   # Markdown + boxes per document",
}

# subcommand -> (module, add-arguments function, main function, help)
COMMANDS = {
    "chat": ("dsvl2.cli_serve", "add_chat_arguments", "chat_main", "ask about images (REPL without a question)"),
    "ground": ("dsvl2.cli_serve", "add_ground_arguments", "ground_main", "locate an object and draw its box"),
    "serve": ("dsvl2.cli_serve", "add_serve_arguments", "serve_main", "OpenAI-compatible HTTP server + web chat"),
    "info": ("dsvl2.cli", "add_info_arguments", "info_main", "parameters, activated parameters, memory"),
    "eval": ("dsvl2.evaluation.run", "add_eval_arguments", "eval_main", "run a benchmark from local files"),
    "train": ("dsvl2.cli_train", "add_train_arguments", "train_main", "train a stage (align / pretrain / sft)"),
    "ocr": ("dsvl2.ocr", "add_ocr_arguments", "ocr_main", "PDFs / page images -> Markdown with DeepSeek-OCR 2"),
}


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (reads config.json only; default: the demo model)")
    src.add_argument("--preset", choices=["tiny", "small", "base", "toy"], help="a built-in config instead")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--context", type=int, default=None, help="tokens of KV cache to budget (default: the context limit)")
    parser.add_argument("--device", default=None,
                        help="device the plan is resolved for (default: cuda if available, else cpu)")
    parser.add_argument("--exact", action="store_true", help="show the exact plan (every op in its reference form)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="memory of the weight-only quantized language model (as dsvl2.load(quantize=...))")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def info_main(args: argparse.Namespace) -> int:
    from .config import PRESETS
    from .config_ocr2 import read_config
    from .stats import count_parameters, human

    if args.preset:
        cfg, source = PRESETS[args.preset], f"preset {args.preset}"
    else:
        if args.model is None:
            from .assets import default_model_dir

            args.model = str(default_model_dir())
        cfg, source = read_config(args.model), args.model
    lc = cfg.language_config
    counts = count_parameters(cfg)
    width = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    context = args.context or lc.max_position_embeddings
    kv_token = lc.cache_values_per_token * lc.num_hidden_layers * width
    info = {
        "source": source,
        "attention": "MLA (latent cache)" if lc.use_mla else "MHA",
        "router": f"{lc.topk_method}/{lc.scoring_func}, {lc.num_experts_per_tok} of {lc.n_routed_experts} experts "
                  f"+ {lc.n_shared_experts} shared",
        "layers": lc.num_hidden_layers, "hidden": lc.hidden_size, "vocab": lc.vocab_size,
        "tile": cfg.vision_config.image_size, "params_total": counts.total, "params_activated": counts.activated,
        "params_read_per_decoded_token": counts.decode_read, "dtype": args.dtype,
        "weights_bytes": counts.total * width, "kv_cache_bytes_per_token": kv_token,
        "kv_cache_bytes_at_context": kv_token * context, "context": context,
        "plan": _plan(args).as_dict(),
    }
    if args.quantize:
        import torch

        from .model.quant import weight_bytes
        from .model.vlm import DSVL2

        with torch.device("meta"):
            model = DSVL2(cfg)
        info["quantize"] = args.quantize
        info["weights_bytes_quantized"], largest = weight_bytes(model, width, args.quantize)
        # loading quantizes tensor by tensor: the model plus one tensor in the load dtype (+ its fp32 chunks)
        info["load_peak_bytes_estimate"] = info["weights_bytes_quantized"] + largest
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {source}")
    print(f"attention    {info['attention']}; router {info['router']}")
    print(f"layers       {lc.num_hidden_layers} x hidden {lc.hidden_size}, vocab {lc.vocab_size}, tile {info['tile']} px")
    print(f"parameters   {human(counts.total)} total, {human(counts.activated)} activated per token "
          f"({human(counts.decode_read)} read per decoded token)")
    print(f"  vision {human(counts.vision)} (+{human(counts.vision_unused_pool)} unused pooling head), "
          f"projector {human(counts.projector)}, embeddings {human(counts.embed)}, lm_head {human(counts.lm_head)}")
    print(f"  attention {human(counts.attention)}, dense FFN {human(counts.dense_ffn)}, shared experts "
          f"{human(counts.shared_experts)}, routed experts {human(counts.routed_experts)}")
    print(f"memory       weights {human(info['weights_bytes'], 'B')} in {args.dtype}; KV cache "
          f"{human(kv_token, 'B')}/token -> {human(kv_token * context, 'B')} at {context} tokens")
    if args.quantize:
        print(f"  --quantize {args.quantize}: weights {human(info['weights_bytes_quantized'], 'B')} (language model "
              f"{args.quantize}, vision/projector/embeddings/norms {args.dtype}); loading peaks near "
              f"{human(info['load_peak_bytes_estimate'], 'B')} (+ the process, ~0.5 GB)")
    print("plan         " + "\n             ".join(info["plan"]["why"]))
    return 0


def _plan(args: argparse.Namespace):
    """The execution plan ``dsvl2.load`` would choose for this dtype and device here (model/plan.py)."""
    from .model.plan import resolve
    from .pipeline import default_device, resolve_dtype

    return resolve(args.device or default_device(), resolve_dtype(args.dtype), args.exact)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsvl2", description="DeepSeek-VL2 in plain PyTorch: chat, ground, serve, evaluate, train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  " + "\n  ".join(EXAMPLES[c] for c in ("chat", "ground", "serve", "info"))
               + "\n\n" + EXIT_HELP,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add, main, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog="example:\n  " + EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        try:
            getattr(importlib.import_module(module), add)(p)
        except ImportError as e:  # an optional extra is missing: say which, at run time
            p.set_defaults(_missing=str(e))
        p.epilog = f"{p.epilog}\n\n{EXIT_HELP}"
        p.set_defaults(_main=(module, main))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "_missing", None):  # a correct command this installation cannot run
        print(f"dsvl2 {args.command}: {args._missing} (install the extra, e.g. pip install 'dsvl2[serve]')",
              file=sys.stderr)
        return EXIT_FAILURE
    module, func = args._main
    return run_command(f"dsvl2 {args.command}", getattr(importlib.import_module(module), func), args)


if __name__ == "__main__":
    sys.exit(main())
