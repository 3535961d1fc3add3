"""DeepSeekMoE feed-forward: router, routed experts (stacked), shared experts.

Routing reproduces ``MoEGate`` of DeepSeek's ``modeling_deepseek.py`` in fp32 (spec §7.6):
- ``greedy`` (Tiny, Small): softmax scores, top-k (``sorted=False``), weights used un-renormalised
  unless ``norm_topk_prob``, times ``routed_scaling_factor``;
- ``noaux_tc`` (Base): sigmoid scores; the correction bias only *selects* experts (after the
  group-limited step, trivial for ``n_group = 1``); weights are the unbiased scores, renormalised then
  scaled.
The combine follows the official ``moe_infer``: each expert runs once on all of its rows, outputs are
cast to fp32, weighted, summed over the k slots in router order and cast back. The same dispatch is
differentiable, so training uses it too; for ``noaux_tc`` the selection is not differentiable but the
gathered weights are (spec P8), and the bias is updated outside autograd (``update_bias``).

Expert weights are stacked ``(E, I, D)`` tensors (``checkpoint.py`` stacks/unstacks the official
per-expert keys), so routed experts are plain tensor indexing, with no per-expert modules.

Dispatch (``dispatch``): the (token, slot) rows are sorted by expert id and each expert multiplies its
contiguous block of rows in one grouped matmul (``torch._grouped_mm`` with per-expert row offsets
computed on the device): no Python loop over experts, no host sync, autograd included. Each group is
the same GEMM the official per-expert loop runs (same rows, same row count), so the result is
bit-identical to ``Experts.forward_per_expert``, the plain loop kept beside it (tested), which is also
the fallback where the grouped kernel is unavailable (CUDA before sm90, fp16/fp64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..config import LanguageConfig
from . import cpu_kernels
from .plan import EXACT, Plan
from .layers import MLP, wide


class Router(nn.Module):
    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.noaux = cfg.topk_method == "noaux_tc"
        self.n_group = cfg.n_group or 1
        self.topk_group = cfg.topk_group or 1
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if self.noaux:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> fp32 routing scores (N, E)."""
        logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))
        return logits.sigmoid() if self.noaux else logits.softmax(dim=-1, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> expert ids (N, K), fp32 weights (N, K), fp32 scores (N, E)."""
        if self.plan.kernels and (routed := cpu_kernels.router(self, x)) is not None:  # one decode row in C
            return routed
        scores = self.scores(x)
        if self.noaux:
            n = scores.shape[0]
            choice = scores + self.e_score_correction_bias.unsqueeze(0)  # (N, E), bias promoted to fp32
            group_scores = choice.view(n, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)  # (N, G)
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(n, self.n_group, self.n_experts // self.n_group).reshape(n, -1)
            choice = choice.masked_fill(~score_mask.bool(), 0.0)
            idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # (N, K)
            weight = scores.gather(1, idx)
        else:
            weight, idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling
        else:
            weight = weight * self.scaling
        return idx, weight, scores


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for activations like ``x`` (CPU: fp32/bf16; CUDA: bf16 on sm90+)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        # The op's meta function (used when compiling) accepts bf16 only, as its CUDA kernel does.
        return x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling())
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (no host syncs allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def dispatch(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, n_experts: int,
             run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x (N, D), idx/weight (N, K) -> sum_k weight * expert_idx(x), in x's dtype.

    ``run(rows, counts)`` applies the experts to ``rows`` (N*K, D), sorted by expert id with
    ``counts`` (E,) int32 rows per expert, and returns (N*K, D). The combine is the official one:
    outputs back in (token, slot) order, cast to fp32, weighted, summed over slots in router order.
    """
    n, k = idx.shape
    flat = idx.reshape(-1)  # (N*K,)
    order = flat.argsort(stable=True)
    # bincount would size its output from max(flat) (a host sync on CUDA); scatter_add_ does not.
    counts = torch.zeros(n_experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))  # (E,)
    grouped = run(x[order // k], counts)  # (N*K, D) grouped by expert
    out = torch.empty_like(grouped).index_copy_(0, order, grouped).view(n, k, -1)  # (token, slot) order, no clone
    # The official (N, K, D) fp32 product summed over K, accumulated slot by slot instead: the same
    # products (bf16 * fp32 promotes exactly) added in the same order (tested bit-identical), without
    # two (N, K, D) fp32 temporaries (32 MB each at a 1,000-token Tiny prefill).
    combined = out[:, 0] * weight[:, :1]  # (N, D) fp32
    for j in range(1, k):
        combined = combined + out[:, j] * weight[:, j:j + 1]
    return combined.to(x.dtype)


COLUMN_FORM_MAX_TOKENS = 16  # up to here every expert has <= 16 rows: the bf16 column form is bit-exact


def _stride_aligned(x: torch.Tensor) -> torch.Tensor:
    """x (R, C) copied into a buffer whose rows start every multiple of 8 elements (16-byte strides)."""
    r, c = x.shape
    out = x.new_empty(r, (c + 7) // 8 * 8)[:, :c]  # (R, C) view, row stride padded
    return out.copy_(x)


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights: gate/up (E, I, D), down (E, D, I)."""

    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, n_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.zeros(n_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.zeros(n_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.zeros(n_experts, hidden, intermediate))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (N, D), idx/weight (N, K) -> sum_k weight * expert_idx(x): one grouped GEMM per projection."""
        isa = self.plan.kernels
        if (x.shape[0] <= cpu_kernels.MOE_MAX_TOKENS and cpu_kernels.usable(isa, x, self.gate_proj)
                and not parametrize.is_parametrized(self)):  # the fused decode kernel
            return cpu_kernels.moe(x, self.gate_proj, self.up_proj, self.down_proj, idx, weight, isa)
        if wide(x, self.plan) and not parametrize.is_parametrized(self):
            run = self._per_expert_wide  # no native bf16 here: fp32, one expert's weights widened at a time
        elif not grouped_mm_supported(x):
            run = self._gathered if capturing() else self._per_expert  # no host sync inside a CUDA graph
        elif self._column_form_ok(x):
            run = self._grouped_columns  # decode on CPU: at most N rows per expert
        else:
            run = self._grouped
        return dispatch(x, idx, weight, self.gate_proj.shape[0], run)

    def forward_per_expert(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The plain form: a Python loop running each expert once on its rows (reads counts on the host)."""
        return dispatch(x, idx, weight, self.gate_proj.shape[0], self._per_expert)

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0, dtype=torch.int32)  # (E,) end row of each expert's block
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj  # read once (LoRA parametrizations)
        h = F.silu(torch._grouped_mm(rows, gate.mT, offs=offs)) * torch._grouped_mm(rows, up.mT, offs=offs)
        return torch._grouped_mm(h, down.mT, offs=offs)  # (N*K, D)

    def _column_form_ok(self, x: torch.Tensor) -> bool:
        """bf16 on CPU (where it is faster and exact; in fp32 the two forms round differently), few
        tokens, and widths giving the weights, now the op's 3-D left operand, 16-byte strides. Not when
        compiling: inductor drops the padded row stride of the activations that the op needs."""
        _, i, d = self.gate_proj.shape
        return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[0] <= COLUMN_FORM_MAX_TOKENS
                and i % 8 == 0 and d % 8 == 0 and not torch.compiler.is_compiling())

    def _grouped_columns(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same GEMMs transposed, weights on the left: ``W_e (O, D) @ rows_e^T (D, c)``.

        On CPU torch runs a one-column product through its GEMV kernel, ~15% faster than a one-row
        product through the GEMM path (bench/decode.py), with bit-identical results as long as each
        expert has few rows (held by a test up to ``COLUMN_FORM_MAX_TOKENS``).
        """
        offs = counts.cumsum(0, dtype=torch.int32)  # (E,)
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        cols = _stride_aligned(rows.mT)  # (D, N*K)
        h = F.silu(torch._grouped_mm(gate, cols, offs=offs)) * torch._grouped_mm(up, cols, offs=offs)  # (I, N*K)
        return torch._grouped_mm(down, _stride_aligned(h), offs=offs).mT  # (N*K, D)

    def _gathered(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Fixed shapes, no host sync: each row multiplies its own expert's weights, gathered (R, I, D).

        For CUDA-graph capture where the grouped GEMM is unavailable (before sm90, fp16/fp32): it copies
        one expert's weights per row, so it suits decode batches (rows <= a few experts' worth), not
        prefill. Close to the per-expert loop, not bit-identical (batched GEMV instead of a GEMM).
        """
        ends = counts.cumsum(0, dtype=torch.long)  # (E,)
        expert = torch.searchsorted(ends, torch.arange(rows.shape[0], device=rows.device), right=True)  # (R,)
        x = rows.unsqueeze(-1)  # (R, D, 1)
        h = F.silu(torch.bmm(self.gate_proj[expert], x)) * torch.bmm(self.up_proj[expert], x)  # (R, I, 1)
        return torch.bmm(self.down_proj[expert], h).squeeze(-1)  # (R, D)

    def _per_expert(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                outs.append(self.expert(e, rows[start:start + c]))
                start += c
        return torch.cat(outs, dim=0)

    def _per_expert_wide(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``_per_expert`` with each GEMM in fp32 (weights widened per expert), rounded where it rounds."""
        outs, start, dt = [], 0, rows.dtype
        for e, c in enumerate(counts.tolist()):
            if c:
                r = rows[start:start + c].float()
                g = F.linear(r, self.gate_proj[e].float()).to(dt)
                u = F.linear(r, self.up_proj[e].float()).to(dt)
                outs.append(F.linear((F.silu(g) * u).float(), self.down_proj[e].float()).to(dt))
                start += c
        return torch.cat(outs, dim=0)


class MoE(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_counts: torch.Tensor | None = None
        self.balance_mask: torch.Tensor | None = None  # (B, T) real tokens, set by a trainer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.view(-1, d)
        idx, weight, scores = self.gate(flat)
        if (self.experts.plan.kernels and not self.training
                and (y := cpu_kernels.moe_layer(self, flat, idx, weight)) is not None):
            return y.view(b, t, d)  # decode rows: routed and shared experts in one C call (inference only)
        y = self.experts(flat, idx, weight).view(b, t, d)
        if self.training:
            self._record_balance(idx, scores, b, t)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def _record_balance(self, idx: torch.Tensor, scores: torch.Tensor, b: int, t: int) -> None:
        """Sequence-level balance loss (``seq_aux``) of the official gate, plus counts for bias updates.

        ``balance_mask`` (B, T), when a trainer sets it, leaves padding out of the counts and score means
        (the official gate counts every position; with no mask the result is the official one).
        """
        e, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        mask = self.balance_mask
        valid = (mask.reshape(b, t).to(torch.float32) if mask is not None and mask.numel() == b * t
                 else torch.ones(b, t, device=idx.device))  # (B, T)
        counts = torch.zeros(b, e, device=idx.device, dtype=torch.float32)
        counts.scatter_add_(1, idx.view(b, t * k), valid.repeat_interleave(k, dim=1))
        self.last_expert_counts = counts.sum(0).detach()
        alpha = self.cfg.aux_loss_alpha
        if alpha <= 0:
            self.last_aux_loss = None
            return
        n = valid.sum(dim=1).clamp_min(1.0)  # (B,) real tokens per sequence
        weighted = scores.view(b, t, e) * valid.unsqueeze(-1)  # (B, T, E)
        if self.cfg.seq_aux:
            ce = counts / (n.unsqueeze(1) * k / e)  # (B, E)
            self.last_aux_loss = alpha * (ce * (weighted.sum(dim=1) / n.unsqueeze(1))).sum(dim=1).mean()
        else:
            total = n.sum()
            freq = counts.sum(0) / (total * k) * e
            self.last_aux_loss = alpha * (freq * weighted.sum(dim=(0, 1)) / total).sum()

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): nudge the correction bias toward balance."""
        if not self.gate.noaux or self.last_expert_counts is None:
            return
        counts = self.last_expert_counts
        self.gate.e_score_correction_bias.add_(rate * torch.sign(counts.mean() - counts).to(
            self.gate.e_score_correction_bias.dtype))
