"""Distributed set-up and model wrapping, kept out of the models.

Order of application to a built model (as in torchtitan): activation checkpointing, then
``torch.compile``, then DDP or FSDP2 (``fully_shard`` per transformer block, then the root, with
a bf16 mixed-precision policy on GPUs). ``torchrun`` provides RANK / WORLD_SIZE / LOCAL_RANK and
the rendezvous; a plain ``python -m hieratok train`` is a world of one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "resolve_device", "wrap_model", "unwrap", "barrier", "is_fsdp"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: Optional[str | torch.device], local_rank: int, cuda_available: bool) -> torch.device:
    """This rank's device: the local rank's GPU when none is named (CPU without CUDA); a bare
    ``"cuda"`` also means the local rank's GPU (``torch.cuda.set_device`` needs an index)."""
    if device is None:
        return torch.device("cuda", local_rank) if cuda_available else torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


def init_distributed(device: Optional[str | torch.device] = None) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) or return a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local, torch.cuda.is_available())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (FSDP2 shards in place: returned as is)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the entries of every ``nn.ModuleList`` named ``blocks``
    (the ViT stacks of the tokenizers, DiT, GPT), outermost lists only."""
    found: list[str] = []
    blocks: list[nn.Module] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "blocks" and \
                not any(name.startswith(f + ".") for f in found):
            found += [f"{name}.{i}" for i in range(len(m))]
            blocks += list(m)
    return blocks


def wrap_model(
    model: nn.Module,
    info: DistInfo,
    *,
    fsdp: bool = False,
    compile: bool = False,
    grad_checkpointing: bool = False,
    bf16: bool = False,
    need_blocks: bool = True,
) -> nn.Module:
    """Apply checkpointing, compile and DDP/FSDP2 to ``model`` (already on ``info.device``).

    ``compile`` compiles each transformer block and FSDP2 shards each block, then the root.
    ``need_blocks=False`` lets a small module without blocks (a discriminator) be sharded as one
    unit and left uncompiled; otherwise a model without blocks is a ValueError.
    """
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
        model.set_grad_checkpointing(True)
    blocks = _blocks(model)
    if need_blocks and not blocks and (compile or (fsdp and info.distributed)):
        raise ValueError(f"{type(model).__name__} has no `blocks` nn.ModuleList: compile / fsdp work per block; "
                         "turn them off for this model")
    if compile:
        for blk in blocks:
            blk.compile()
    if not info.distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for blk in blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on every rank, for DDP, FSDP2 or a plain module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def load_full_state_dict(model: nn.Module, sd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
