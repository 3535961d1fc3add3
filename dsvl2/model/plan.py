"""The execution plan: how every op that has a fast form runs on this model and machine.

Resolved once when a model is loaded (:func:`resolve`, from the device, the dtype and what the CPU can
do) and handed to the modules (:func:`apply`): each module with a fast form holds the plan and asks it,
at its one dispatch point, whether to take that form; every op keeps its reference form as its readable
definition. The plan is immutable and per model, so two models in one process can run different plans.

Entries:
- ``kernels``: which build of dsvl2's C kernels (``cpu_kernels.ISAS``) runs batch-1 decode (GEMV, fused
  experts, MHA / MLA step, RMSNorm, router) and the vision tower's tanh-GELU, or None (torch only);
- ``fused_attention``: attention through SDPA in prefill and decode, MLA's prefill in the decompressed
  form (torch's flash kernels; faster on long prompts);
- ``wide_gemms``: on a CPU without native bf16 dot products, the GEMMs of more than
  ``cpu_kernels.MOE_MAX_TOKENS`` rows (vision, prefill) compute in fp32, the weights widened one layer
  (one expert) at a time and kept in their stored dtype: torch's bf16 GEMM there is emulated, ~5x slower.
Both are bf16-close, not bit-identical, to the reference; ``EXACT`` (``dsvl2.load(..., exact=True)``,
``--exact``) turns every one off: the path the parity tests hold to the official numbers. A future
entry (a CUDA-graph decode step, say) is one more field here and one more line in :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_kernels


@dataclass(frozen=True)
class Plan:
    kernels: str | None = None  # build of the C kernels (cpu_kernels.ISAS) or None
    fused_attention: bool = False  # SDPA prefill / decode, decompressed-MLA prefill
    wide_gemms: bool = False  # GEMMs of many rows in fp32 (CPUs without native bf16)
    why: tuple[str, ...] = ()  # one line per entry: what was chosen and the reason

    def __post_init__(self) -> None:
        if self.kernels is not None and self.kernels not in cpu_kernels.ISAS:
            raise ValueError(f"unknown kernel build {self.kernels!r}; one of {cpu_kernels.ISAS}")

    @property
    def exact(self) -> bool:
        """Whether every op runs its reference form."""
        return self.kernels is None and not self.fused_attention and not self.wide_gemms

    def replace(self, **changes: object) -> Plan:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, object]:
        return {"exact": self.exact, "kernels": self.kernels, "fused_attention": self.fused_attention,
                "wide_gemms": self.wide_gemms, "why": list(self.why)}

    def describe(self) -> str:
        return "; ".join(self.why) if self.why else ("exact (reference path)" if self.exact else str(self))


EXACT = Plan(why=("exact: every op in its reference form",))


def resolve(device: torch.device | str, dtype: torch.dtype, exact: bool = False) -> Plan:
    """The fast plan for a model of ``dtype`` on ``device`` on this machine (``EXACT`` if ``exact``)."""
    if exact:
        return Plan(why=("exact: requested (exact=True / --exact), every op in its reference form",))
    device = torch.device(device)
    why = ["attention: SDPA in prefill and decode (bf16-close)"]
    kernels = None
    if device.type != "cpu":
        why.append(f"kernels: none (the C kernels are CPU-only; this model is on {device.type})")
    elif dtype != torch.bfloat16:
        why.append(f"kernels: none (they read bf16 activations; this model is {str(dtype).removeprefix('torch.')})")
    else:
        kernels, reason = cpu_kernels.host_isa()
        why.append(f"kernels: {kernels} ({reason})" if kernels else f"kernels: none ({reason})")
    wide = device.type == "cpu" and dtype == torch.bfloat16 and kernels not in (None, "avx512")
    if wide:
        why.append("GEMMs of many rows (vision, prefill) in fp32, weights widened per layer (no native bf16 here)")
    return Plan(kernels=kernels, fused_attention=True, wide_gemms=wide, why=tuple(why))


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """Hand ``plan`` to ``model`` and every submodule that dispatches on it (those with a ``plan`` attribute)."""
    if plan.kernels is not None:
        cpu_kernels.load(plan.kernels)  # compile now, and fail here rather than in the first forward
    for module in model.modules():
        if hasattr(module, "plan"):
            module.plan = plan
    model.plan = plan
    return model


def plan_of(model: nn.Module) -> Plan:
    """The plan ``model`` runs (``EXACT`` if none was applied)."""
    return getattr(model, "plan", EXACT)
