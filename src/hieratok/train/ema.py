"""Exponential moving average of model weights (kept in fp32, sharded like the model under FSDP2)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["EMA"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """``shadow = decay_t * shadow + (1 - decay_t) * param`` with ``decay_t = min(decay, (1+n)/(10+n))``.

    Args:
        model: the (possibly FSDP2-sharded) model; parameter names are its ``named_parameters``.
        decay: the asymptotic decay.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [_local(p.detach()).float().clone() for n, p in model.named_parameters() if p.requires_grad]

    def _params(self, model: nn.Module) -> Iterable[torch.Tensor]:
        return (p for p in model.parameters() if p.requires_grad)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, self._params(model)):
            s.lerp_(_local(p.detach()).float(), 1.0 - d)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """EMA weights under the model's parameter names, unsharded, on CPU (collective under FSDP2)."""
        out = {}
        for name, s, p in zip(self.names, self.shadow, self._params(model)):
            if hasattr(p, "device_mesh"):  # DTensor: rebuild the global tensor
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            out[name] = s.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], num_updates: int) -> None:
        for i, (name, p) in enumerate(zip(self.names, self._params(model))):
            full = sd[name].to(self.shadow[i].device)
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
            self.shadow[i].copy_(full)
        self.num_updates = num_updates

    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (an unsharded copy, e.g. for evaluation)."""
        with torch.no_grad():
            for s, p in zip(self.shadow, self._params(model)):
                p.copy_(s.to(p.dtype))
