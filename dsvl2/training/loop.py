"""The one training loop all stages share, with atomic, resumable checkpoints.

Per step: the mixture names this process's samples (:class:`~dsvl2.training.data.Mixture`), they are
packed into rows with a block-causal mask (restarting positions per sample), the forward runs (bf16
autocast optional, decompressed MLA, gradient checkpointing optional), and the loss is the shifted
causal cross-entropy summed over the labelled tokens of the *global* batch and divided by their count
(spec §6.4). The MoE sequence-balance losses are added for backward only, never to the reported loss
(spec §7.6). Then: gradient clipping at ``grad_clip``, AdamW, the scheduler, and for ``noaux_tc``
routers the correction-bias update (spec P8; new behaviour).

Checkpoints (``out/checkpoints/step-XXXXXXXX``) hold the model in the official Hugging Face layout
(``config.json`` + safetensors, what :func:`dsvl2.load` reads) and ``trainer.pt`` with the optimizer,
scheduler, RNG states and the data position (per-source draw counters). A checkpoint is written into a
temporary directory and renamed, then ``out/checkpoints/latest`` is replaced atomically, so a run
killed at any moment resumes from the last complete checkpoint to the identical loss trajectory.

Each run writes ``out/metrics.jsonl`` (one row per step; truncated back to the checkpoint on resume)
and ``out/loss.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.checkpoint import load_model, save_model
from dsvl2.errors import CheckpointError
from dsvl2.model.moe import MoE
from dsvl2.training import distributed as D
from dsvl2.training.lora import has_lora, load_adapter_weights, save_adapter
from dsvl2.training.data import IGNORE_INDEX, Mixture, StepPlan, TrainBatch, block_causal_mask
from dsvl2.training.stages import StageConfig, apply_freezing, make_optimizer

CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer.pt"


# ---- loss -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Inside: float32 denormals count as zero on the CPU (FTZ/DAZ); this thread's previous mode is
    restored after (threads torch started inside keep the flushing mode).

    As a model trains, attention sharpens and softmax starts producing probabilities below 1e-38,
    which x86 CPUs compute through slow microcode assists. In the demo build's ViT, the flash-attention backward took
    3.4x longer at step 2,000 than at step 50 for this reason (docs/training.md). Worker threads copy
    the mode of the thread that creates them, so enter this before torch first runs something in
    parallel (the entry points do); in a process whose threads exist already, only this thread changes.
    """
    before = torch.tensor([1e-39]).item() == 0.0  # a float32 denormal reads back as 0 when flushing
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def additive_mask(seq_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) sample ids -> (B, 1, T, T) additive block-causal mask (0 allowed, finfo.min blocked)."""
    allowed = block_causal_mask(seq_ids)
    return torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def forward_loss(model: nn.Module, batch: TrainBatch, stage: StageConfig, global_tokens: int,
                 world: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, summed token CE of this process, aux loss) for one batch.

    ``global_tokens`` is the number of labelled tokens over all processes; the backward loss is
    ``world * ce_sum / global_tokens + aux`` because gradients are averaged over processes.
    """
    mask = additive_mask(batch.seq_ids, torch.float32)
    for moe in moe_layers(model):  # padding stays out of the balance loss and the bias-update counts
        moe.balance_mask = batch.attention_mask
    autocast = torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16) if stage.bf16 else contextlib.nullcontext()
    with autocast:
        logits = model(batch.input_ids, batch.attention_mask, batch.images, batch.images_seq_mask,
                       batch.images_spatial_crop, positions=batch.position_ids, mask=mask,
                       expanded=stage.expanded_mla)  # (B, T, V) fp32
    labels = batch.labels[:, 1:]
    ce_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    aux = torch.zeros((), device=logits.device)
    for moe in moe_layers(model):
        if moe.last_aux_loss is not None:
            aux = aux + moe.last_aux_loss
    return ce_sum * world / max(global_tokens, 1) + aux, ce_sum.detach(), aux.detach()


def set_aux_alpha(model: nn.Module, alpha: float | None) -> None:
    """Apply the stage's balance-loss weight to every MoE layer (None: the checkpoint config's)."""
    for moe in moe_layers(model):
        value = model.cfg.language_config.aux_loss_alpha if alpha is None else alpha
        moe.cfg = dataclasses.replace(moe.cfg, aux_loss_alpha=value)


def update_router_bias(model: nn.Module, rate: float, env: D.DistEnv) -> None:
    """noaux_tc: move each correction bias toward balance using the counts of all processes."""
    for moe in moe_layers(model):
        if moe.gate.noaux and moe.last_expert_counts is not None:
            moe.last_expert_counts = D.all_sum(moe.last_expert_counts, env)
            moe.update_bias(rate)


# ---- checkpoints ----------------------------------------------------------------------------------
class _StateView:
    """What :func:`save_model` needs from a model (``cfg`` and ``state_dict``), over a gathered state."""

    def __init__(self, cfg: Any, state: dict[str, torch.Tensor]) -> None:
        self.cfg, self._state = cfg, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_model(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None,
                 env: D.DistEnv = D.DistEnv()) -> None:
    """Write the model in the official Hugging Face layout (optionally cast, e.g. to bf16), atomically."""
    state = D.full_model_state(model, env)
    if not env.is_main:
        return
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(_StateView(model.cfg, state), tmp)
    if directory.exists():
        for item in tmp.iterdir():  # keep other files (tokenizer, README) of an existing directory
            os.replace(item, directory / item.name)
        tmp.rmdir()
    else:
        os.replace(tmp, directory)


def save_checkpoint(out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    sched: Any, counters: dict[str, int], stage: StageConfig, env: D.DistEnv) -> Path:
    """Model (HF layout) + trainer state into ``step-XXXXXXXX``; temp dir, rename, then ``latest``."""
    root = out / CKPT_DIR
    final = root / f"step-{step:08d}"
    model_state = D.full_model_state(model, env)
    opt_state = D.full_optimizer_state(model, opt, env)
    if env.is_main:
        tmp = root / f".step-{step:08d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if has_lora(model):  # adapters only: the base weights do not change
            save_adapter(model, tmp)
        else:
            save_model(_StateView(model.cfg, model_state), tmp)
        torch.save({"step": step, "counters": counters, "optimizer": opt_state,
                    "scheduler": sched.state_dict(), "stage": dataclasses.asdict(stage),
                    "world": env.world, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
                   tmp / TRAINER_STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
        old = sorted(p for p in root.glob("step-*") if p.is_dir())
        for p in old[: max(0, len(old) - stage.keep_checkpoints)]:
            shutil.rmtree(p, ignore_errors=True)
    D.barrier(env)
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    """The directory named by ``out/checkpoints/latest``, or None before the first checkpoint."""
    pointer = Path(out) / CKPT_DIR / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{pointer} names {path}, which has no {TRAINER_STATE}")
    return path


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    env: D.DistEnv) -> tuple[int, dict[str, int]]:
    """Restore model, optimizer, scheduler and RNG; returns (step, data counters)."""
    state = torch.load(path / TRAINER_STATE, weights_only=False)
    if state["world"] != env.world:
        raise CheckpointError(f"{path} was written by {state['world']} process(es), this run has {env.world}")
    if has_lora(model):
        load_adapter_weights(model, path)
    else:
        weights = load_model(path, dtype=torch.float32).state_dict()
        D.load_full_model_state(model, weights, env)
    D.load_full_optimizer_state(model, opt, state["optimizer"], env)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), dict(state["counters"])


# ---- batches --------------------------------------------------------------------------------------
class _PlanBatches(torch.utils.data.Dataset):
    """DataLoader adapter: a :class:`StepPlan` -> (plan, TrainBatch), built in a worker if asked."""

    def __init__(self, mixture: Mixture, seq_len: int, pad_id: int) -> None:
        self.mixture, self.seq_len, self.pad_id = mixture, seq_len, pad_id

    def __getitem__(self, plan: StepPlan) -> tuple[StepPlan, TrainBatch]:  # type: ignore[override]
        return plan, self.mixture.batch(plan, self.seq_len, self.pad_id)


def _plans(mixture: Mixture, stage: StageConfig, start: int, stop: int, counters: dict[str, int],
           env: D.DistEnv) -> Iterator[StepPlan]:
    for step in range(start, stop):
        plan = mixture.plan(step, stage.batch_size, counters, env.rank, env.world)
        counters = plan.counters
        yield plan


def batches(mixture: Mixture, stage: StageConfig, start: int, stop: int, counters: dict[str, int],
            pad_id: int, env: D.DistEnv, workers: int = 0) -> Iterator[tuple[StepPlan, TrainBatch]]:
    """(plan, batch) for steps ``start..stop-1``; ``workers`` > 0 builds batches in the background."""
    plans = _plans(mixture, stage, start, stop, counters, env)
    data = _PlanBatches(mixture, stage.seq_len, pad_id)
    if workers == 0:
        return (data[p] for p in plans)
    loader = torch.utils.data.DataLoader(data, sampler=plans, batch_size=None, num_workers=workers,
                                         prefetch_factor=4, collate_fn=lambda x: x)
    return iter(loader)


# ---- the loop -------------------------------------------------------------------------------------
def train(model: nn.Module, stage: StageConfig, sources: dict[str, Any], out: str | Path, *, pad_id: int,
          env: D.DistEnv = D.DistEnv(), resume: bool = True, workers: int = 0, progress: bool = True,
          stop_after: int | None = None, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Run (or resume) one stage; returns the metrics rows of the whole stage.

    ``model`` is a :class:`~dsvl2.model.vlm.DSVL2` (already sharded by
    :func:`~dsvl2.training.distributed.shard_model` for FSDP). ``sources`` maps the mixture's names to
    sample sources. ``stop_after`` ends this call after that many steps (a checkpoint is written),
    which is how a long run is split; the next call with ``resume`` continues it.
    """
    out = Path(out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(stage.seed)
    random.seed(stage.seed)
    model.train()
    apply_freezing(model, stage)
    set_aux_alpha(model, stage.aux_loss_alpha)
    model.vision.gradient_checkpointing = stage.gradient_checkpointing
    model.language.model.gradient_checkpointing = stage.gradient_checkpointing
    opt, sched = make_optimizer(model, stage)
    mixture = Mixture(sources, stage.mixture, stage.seed)
    step, counters = 0, {}
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        step, counters = load_checkpoint(ckpt, model, opt, sched, env)
    metrics_path = out / "metrics.jsonl"
    rows = _read_metrics(metrics_path, upto=step)
    if env.is_main:
        _atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    stop = stage.steps if stop_after is None else min(stage.steps, step + stop_after)
    bar = Progress(stage, step, enabled=progress and env.is_main)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with open(metrics_path, "a") if env.is_main else contextlib.nullcontext() as log:
        for plan, batch in batches(mixture, stage, step, stop, counters, pad_id, env, workers):
            t0 = time.perf_counter()
            batch = batch.to(device)
            n_local = (batch.labels[:, 1:] != IGNORE_INDEX).sum()
            n_global = int(D.all_sum(n_local, env))
            loss, ce_sum, aux = forward_loss(model, batch, stage, n_global, env.world)
            loss.backward()
            D.sync_gradients(model, env)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, stage.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lr = stage.lr * stage.lr_factor(plan.step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            update_router_bias(model, stage.bias_update_rate, env)
            step = plan.step + 1
            counters = plan.counters
            tokens = int(D.all_sum(batch.attention_mask.sum(), env))
            row = {"stage": stage.stage, "step": step, "loss": float(D.all_sum(ce_sum, env)) / max(n_global, 1),
                   "aux": float(D.all_sum(aux, env)) / env.world, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": tokens, "seconds": time.perf_counter() - t0}
            rows.append(row)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(row)
            every = stage.checkpoint_every
            if step == stop or (every and step % every == 0):
                save_checkpoint(out, step, model, opt, sched, counters, stage, env)
    bar.close()
    if env.is_main and rows:
        plot_losses({f"stage {stage.stage}": [(r["step"], r["loss"]) for r in rows]}, out / "loss.png")
    model.eval()
    return rows


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """Rows of an existing metrics log up to step ``upto`` (later rows belong to a killed run)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if row.get("step", 0) <= upto:
            rows.append(row)
    return rows


# ---- progress and the loss curve ------------------------------------------------------------------
class Progress:
    """One status line: bar, step, loss, lr, tokens/s, ETA (redrawn in a terminal, printed otherwise)."""

    def __init__(self, stage: StageConfig, start: int, enabled: bool = True,
                 stream: Any = None, width: int = 24) -> None:
        self.stage, self.start, self.enabled, self.width = stage, start, enabled, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.every = max(1, stage.log_every)

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.tokens += row["tokens"]
        step, total = row["step"], self.stage.steps
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / done * (total - step) if done else 0.0
        filled = int(self.width * step / total)
        line = (f"stage {self.stage.stage} {self.stage.name} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{step}/{total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s ETA {_clock(eta)}")
        if self.tty:
            self.stream.write("\r" + line)
        elif step % self.every == 0 or step == total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plot_losses(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "training loss",
                size: tuple[int, int] = (900, 500)) -> None:
    """A loss-curve PNG drawn with Pillow: one coloured polyline per series, log-free axes, EMA overlay."""
    from PIL import Image, ImageDraw, ImageFont

    points = [p for pts in series.values() for p in pts if p[1] == p[1]]  # drop NaN
    if not points:
        return
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y1 = max(p[1] for p in points)
    y0 = min(0.0, min(p[1] for p in points))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(13)
    draw.text((w // 2, 12), title, fill="black", font=font, anchor="mt")
    for k in range(6):
        yv = y0 + (y1 - y0) * k / 5
        _, py = xy(x0, yv)
        draw.line([(left, py), (w - right, py)], fill=(230, 230, 230))
        draw.text((left - 6, py), f"{yv:.2f}", fill="black", font=font, anchor="rm")
        xv = x0 + (x1 - x0) * k / 5
        px, _ = xy(xv, y0)
        draw.text((px, h - bottom + 8), f"{xv:.0f}", fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    draw.text((w // 2, h - 16), "step", fill="black", font=font, anchor="mm")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        pts = [p for p in pts if p[1] == p[1]]
        if not pts:
            continue
        light = tuple(int(c + (255 - c) * 0.6) for c in colour)
        if len(pts) > 1:
            draw.line([xy(*p) for p in pts], fill=light, width=1)
        ema, smooth = pts[0][1], []
        for x, y in pts:
            ema = 0.9 * ema + 0.1 * y
            smooth.append(xy(x, ema))
        if len(smooth) > 1:
            draw.line(smooth, fill=colour, width=2)
        draw.text((w - right - 8, top + 8 + 16 * i), name, fill=colour, font=font, anchor="rt")
    img.save(path)


def run_stages(model: nn.Module, stages: list[StageConfig], sources: dict[str, Any], out: str | Path,
               *, pad_id: int, on_stage: Callable[[StageConfig, list[dict[str, Any]]], None] | None = None,
               **kwargs: Any) -> dict[int, list[dict[str, Any]]]:
    """Stages in order, each in ``out/stageN`` (resumable), starting from the previous one's weights."""
    results = {}
    for stage in stages:
        rows = train(model, stage, sources, Path(out) / f"stage{stage.stage}", pad_id=pad_id, **kwargs)
        results[stage.stage] = rows
        if on_stage is not None:
            on_stage(stage, rows)
    return results
