"""Can the demo's vision side learn to read? The demo ViT (or a small CNN) as a plain word classifier.

    python bench/vision_probe.py [--arch vit|cnn] [--crop MARGIN] [--lr 5e-4] [--batch 32] [--minutes 15]
                                 [--model '{"patch": 7, "tile": 112}']

A research probe for the demo model (docs/training.md, "Is it the language model or the vision
side?"), not a speed benchmark: the demo recipe's ViT and projector (``--model`` overrides keys of the
recipe's ``[model]`` table), or a 4-layer stride-2 CNN as a yardstick, attention-pooled over the image
tokens of the processor's views, then a linear head over the 100 words. Training samples are the
reading generator's (``dsvl2.demo.tasks``), or with ``--crop M`` the same images cropped to the word
plus 2..M pixels per side, so that the word fills the view. AdamW (betas 0.9, 0.95), constant lr after
200 warm-up steps, one CPU thread; every 250 steps it prints the samples seen, the mean training loss
(ln 100 = 4.61 is chance) and the accuracy on 400 held-out samples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from random import Random

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.demo import build
from dsvl2.demo import tasks
from dsvl2.model.init import init_params_
from dsvl2.model.vlm import DSVL2
from dsvl2.processing.processor import Processor
from dsvl2.training.stages import load_recipe


def cropped_reading(margin: int):
    """The reading generator, cropped around the word with 2..margin pixels on each side."""
    def make(rng: Random, words):
        s = tasks.make_reading(rng, words)
        x1, y1, x2, y2 = s.meta["text_box"]
        m = [rng.randint(2, margin) for _ in range(4)]
        box = (max(0, x1 - m[0]), max(0, y1 - m[1]), min(s.image.width, x2 + m[2]), min(s.image.height, y2 + m[3]))
        return tasks.Sample(task="reading", image=s.image.crop(box), prompt=s.prompt, answer=s.answer, meta=s.meta)
    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["vit", "cnn"], default="vit")
    ap.add_argument("--model", default="{}", help="JSON overrides of the demo recipe's [model] keys")
    ap.add_argument("--crop", type=int, default=0, help="crop to the word plus up to this margin (0: the real task)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=15.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    m = dict(load_recipe(build.RECIPE)["model"], **json.loads(a.model))
    work = Path(tempfile.mkdtemp(prefix="vision-probe-"))
    tok = build.train_tokenizer(work, m["vocab"])  # the processor needs one; the probe reads no text
    cfg = build.demo_config(m, 1024, tok.bos_id, tok.eos_id)
    processor = Processor(tok, build.write_processor_config(cfg, work))
    if a.crop:
        build.make_sample = lambda task, rng, words: cropped_reading(a.crop)(rng, words)
    source = build.SyntheticSource("qa_reading", processor, True, 0)
    index = {w: i for i, w in enumerate(tasks.load_words())}

    def sample(i: int) -> tuple[torch.Tensor, int]:
        return source[i].images, index[source.conversation(i)[1]["content"]]

    width = cfg.language_config.hidden_size
    if a.arch == "cnn":
        cnn = nn.Sequential(nn.Conv2d(3, 32, 5, 2, 2), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                            nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Conv2d(128, width, 3, 2, 1))
        tokens, params = (lambda x: cnn(x).flatten(2).transpose(1, 2)), list(cnn.parameters())
    else:
        model = DSVL2(cfg)
        init_params_(model, 0, std=m["init_std"], pos_init=m.get("pos_init", "normal"),
                     pos_scale=m.get("pos_scale", 1.0), attn_init=m.get("attn_init", "normal"))
        tokens = lambda x: model.projector(model.vision(x))  # noqa: E731
        params = list(model.vision.parameters()) + list(model.projector.parameters())
    query = nn.Parameter(torch.randn(width) * 0.02)
    head = nn.Linear(width, len(index))
    params += [query, *head.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))

    def logits(images: list[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for views in images:
            t = tokens(views).reshape(-1, width)  # every token of every view
            pooled.append(torch.softmax(F.rms_norm(t, (width,)) @ query, 0) @ t)
        return head(F.rms_norm(torch.stack(pooled), (width,)))

    held_out = [sample(10**9 + i) for i in range(400)]
    print(f"{a.arch} {a.model} crop={a.crop} lr={a.lr} batch={a.batch}", flush=True)
    start, losses, step = time.time(), [], 0
    while time.time() - start < 60 * a.minutes:
        batch = [sample(step * a.batch + j) for j in range(a.batch)]
        loss = F.cross_entropy(logits([b[0] for b in batch]), torch.tensor([b[1] for b in batch]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        step += 1
        if step % 250 == 0:
            with torch.no_grad():
                acc = sum(int(logits([x]).argmax()) == y for x, y in held_out) / len(held_out)
            print(f"samples {step * a.batch:6d}  loss {sum(losses[-250:]) / 250:.3f}  held-out accuracy {acc:.3f}  "
                  f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
