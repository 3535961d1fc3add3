"""Human-readable output of an evaluation: markdown tables, the paper-layout suite table with
DeepSeek's published numbers beside ours, and grounding example images.

Published numbers are only those written in eval-datasets.md: section 2.2 (paper and DeepSeek's
VLMEvalKit reproduction, Tiny and Small; DocVQA, InfoVQA and MMBench were not in that table) and
section 3.10 (RefCOCO family for the base model, as listed by paperswithcode, unconfirmed). A cell
without a number shows ``–``.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# (task, split) -> value, per model size; OCRBench out of 1000, the rest in percent
PAPER: dict[str, dict[tuple[str, str], float]] = {
    "tiny": {("mmmu", "validation"): 40.7, ("mmstar", "val"): 45.9, ("ai2d", "test"): 71.6,
             ("chartqa", "test"): 81.0, ("ocrbench", "test"): 809, ("textvqa", "validation"): 80.7},
    "small": {("mmmu", "validation"): 48.0, ("mmstar", "val"): 57.0, ("ai2d", "test"): 80.0,
              ("chartqa", "test"): 84.5, ("ocrbench", "test"): 834, ("textvqa", "validation"): 83.4},
    "base": {("refcoco", "val"): 95.1, ("refcoco", "testA"): 96.7, ("refcoco", "testB"): 95.1,
             ("refcoco+", "val"): 91.2, ("refcoco+", "testA"): 94.9, ("refcoco+", "testB"): 87.4,
             ("refcocog", "val"): 92.8, ("refcocog", "test"): 92.9},
}
VLMEVALKIT: dict[str, dict[tuple[str, str], float]] = {
    "tiny": {("mmmu", "validation"): 40.2, ("mmstar", "val"): 49.3, ("ai2d", "test"): 74.8,
             ("chartqa", "test"): 81.2, ("ocrbench", "test"): 804, ("textvqa", "validation"): 80.4},
    "small": {("mmmu", "validation"): 47.8, ("mmstar", "val"): 57.0, ("ai2d", "test"): 79.0,
              ("chartqa", "test"): 84.48, ("ocrbench", "test"): 835, ("textvqa", "validation"): 83.34},
}
SECTIONS = (("OCR-related", ("docvqa", "chartqa", "infovqa", "textvqa", "ocrbench")),
            ("General", ("mmstar", "ai2d", "mmmu", "mmbench", "mathvista")),
            ("Visual grounding", ("refcoco", "refcoco+", "refcocog")))
DISPLAY = {"docvqa": "DocVQA", "infovqa": "InfoVQA", "chartqa": "ChartQA", "textvqa": "TextVQA",
           "ocrbench": "OCRBench", "ai2d": "AI2D", "mmstar": "MMStar", "mmbench": "MMBench (en)", "mmmu": "MMMU",
           "mathvista": "MathVista (testmini)",
           "refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}


def fmt(value: float | None, task: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if task == "ocrbench" else f"{value:.2f}"


def markdown(summary: Mapping[str, Any]) -> str:
    """One run: the overall line, then one table per breakdown (e.g. category, split)."""
    task = summary["task"]
    lines = [f"## {DISPLAY.get(task, task)} ({summary['split']})", "",
             "| task | split | metric | n | score |", "|---|---|---|---:|---:|",
             f"| {task} | {summary['split']} | {summary['metric']} | {summary['n']} | {fmt(summary['score'], task)} |"]
    for name, values in summary.get("breakdown", {}).items():
        lines += ["", f"### by {name}", "", f"| {name} | n | score |", "|---|---:|---:|"]
        lines += [f"| {value} | {v['n']} | {fmt(v['score'], task)} |" for value, v in values.items()]
    return "\n".join(lines) + "\n"


def guess_size(model_dir: str | Path | None) -> str | None:
    """``tiny`` / ``small`` / ``base`` from the model folder's name, else None."""
    name = Path(str(model_dir or "")).name.lower()
    for size in ("tiny", "small"):
        if size in name:
            return size
    return "base" if "vl2" in name else None  # the base model is plain "deepseek-vl2"


def paper_table(results: Mapping[tuple[str, str], Mapping[str, Any]], size: str | None) -> str:
    """The suite in the paper's layout: ours, the paper's number and DeepSeek's VLMEvalKit number
    for ``size`` (``–`` where none is published or the data was absent)."""
    label = size or "?"
    lines = [f"| benchmark | split | metric | n | ours | paper ({label}) | VLMEvalKit ({label}) |",
             "|---|---|---|---:|---:|---:|---:|"]
    paper, vlmeval = PAPER.get(size or "", {}), VLMEVALKIT.get(size or "", {})
    for section, tasks in SECTIONS:
        rows = [(key, s) for key, s in results.items() if key[0] in tasks]
        if not rows:
            continue
        lines.append(f"| **{section}** | | | | | | |")
        for (task, split), s in sorted(rows, key=lambda r: tasks.index(r[0][0])):
            key = (task, split)
            lines.append(f"| {DISPLAY.get(task, task)} | {split} | {s['metric']} | {s['n']} | {fmt(s['score'], task)} "
                         f"| {fmt(paper.get(key), task)} | {fmt(vlmeval.get(key), task)} |")
    return "\n".join(lines) + "\n"


def draw_grounding(records: Sequence[Mapping[str, Any]], images: Mapping[str, Any], out_dir: Path,
                   n: int = 8) -> list[Path]:
    """Save up to ``n`` images with the true box (green) and the predicted box (red): the first
    misses, then the first hits, in dataset order. ``images`` maps id -> ImageRef."""
    misses = [r for r in records if r["score"] < 1][: n // 2]
    hits = [r for r in records if r["score"] >= 1][: n - len(misses)]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, rec in enumerate(misses + hits):
        image = images[rec["id"]].load()
        draw = ImageDraw.Draw(image)
        width = max(2, round(min(image.size) / 200))
        draw.rectangle(_clip(rec["answers"], image), outline=(0, 200, 0), width=width)
        pred = rec.get("extra", {}).get("pred_box")
        if pred is not None:
            draw.rectangle(_clip(pred, image), outline=(230, 0, 0), width=width)
        caption = f"{rec.get('extra', {}).get('expression', rec['id'])} | {'hit' if rec['score'] >= 1 else 'miss'}"
        draw.text((4, 4), caption, fill=(230, 0, 0) if pred is None else (0, 0, 0))
        path = out_dir / f"{k:02d}_{'hit' if rec['score'] >= 1 else 'miss'}_{_safe(rec['id'])}.png"
        image.save(path)
        paths.append(path)
    return paths


def _clip(box: Sequence[float], image: Image.Image) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = image.size
    x1, x2 = sorted((min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)))
    y1, y2 = sorted((min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)))
    return x1, y1, x2, y2


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:60]
