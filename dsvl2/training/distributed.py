"""Multi-process training on torch.distributed: ``torchrun`` environment, FSDP2, global reductions.

Launch with ``torchrun --nproc-per-node N -m dsvl2.cli train ...`` (or any launcher that sets
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``). Each process builds the same model from the same seed, then
:func:`shard_model` applies FSDP2 (``torch.distributed.fsdp.fully_shard``) to every ViT block, every
decoder layer and the root, so parameters, gradients and optimizer state are split across processes:
the path for models that do not fit one device. Gradients are reduce-scattered *averaged* over the
processes; the loop therefore scales each process's summed token loss by ``world / global_tokens`` so
the update equals the single-process one on the whole batch (tested with gloo on CPU: 2 x (B/2) ==
1 x B).

Checkpoints gather full (unsharded) state dicts on every rank with the ``torch.distributed.checkpoint``
state-dict API, and rank 0 writes them; loading broadcasts nothing (every rank reads the files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; ``world == 1`` means no process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env(backend: str | None = None, fsdp: bool = True) -> DistEnv:
    """Join the process group described by torchrun's variables; a single process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistEnv(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, fsdp=fsdp)


def shard_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2 on each ViT block and decoder layer, then the root (which holds embeddings and head).

    Without FSDP (``env.fsdp`` False) parameters stay replicated and :func:`sync_gradients`
    averages gradients after backward, which is what DDP does.
    """
    if not env.active or not env.fsdp:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (env.world,))
    for block in model.vision.blocks:
        fully_shard(block, mesh=mesh)
    for layer in model.language.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sync_gradients(model: nn.Module, env: DistEnv) -> None:
    """Average gradients over processes when parameters are replicated (no FSDP)."""
    if not env.active or env.fsdp:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def all_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of ``value`` over processes (a copy; the input is untouched)."""
    out = value.detach().clone()
    if env.active:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def full_model_state(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (a collective when sharded: call it on every rank)."""
    if env.active and env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], env: DistEnv) -> None:
    """Inverse of :func:`full_model_state`: every rank passes the full state, shards are cut locally."""
    if env.active and env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(state, strict=True)


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, env: DistEnv) -> dict:
    if env.active and env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, env: DistEnv) -> None:
    if env.active and env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    opt.load_state_dict(state)


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()
