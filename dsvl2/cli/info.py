"""``dsvl2 info``: parameters, activated parameters, memory and the execution plan of a model or preset.

Reads ``config.json`` only (no weights); ``--quantize`` sizes the model on the meta device.
"""

from __future__ import annotations

import argparse
import json

from . import set_examples

EXAMPLES = ("dsvl2 info --model ./deepseek-vl2-tiny     # or: dsvl2 info --preset small",)


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    set_examples(parser, EXAMPLES)
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
    from ..config import PRESETS
    from ..config_ocr2 import read_config
    from ..stats import count_parameters, human

    if args.preset:
        cfg, source = PRESETS[args.preset], f"preset {args.preset}"
    else:
        if args.model is None:
            from ..assets import default_model_dir

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

        from ..model.quant import weight_bytes
        from ..model.vlm import DSVL2

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
    from ..model.plan import resolve
    from ..pipeline import default_device, resolve_dtype

    return resolve(args.device or default_device(), resolve_dtype(args.dtype), args.exact)
