"""Feed-forward networks of the transformers: the GELU MLP (ViT, DiT, ResTok) and SwiGLU (LlamaGen)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear

__all__ = ["Mlp", "SwiGLU", "swiglu_hidden_dim"]


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (ViT's MLP; ``approximate="tanh"`` gives DiT's).

    Fast path (``inplace_act``; ``False`` is the reference path): when no gradient flows through
    fc1's output (inference), the GELU runs in place on it, which saves one (B, L, hidden) tensor
    per block, and inputs of more than :attr:`CHUNK_BYTES` of hidden activations run in row
    chunks. The chunks keep every hidden tensor below glibc's 32 MiB mmap threshold, so it is
    recycled from the heap instead of being mapped fresh and page-faulted in on each call
    (measured in BENCHMARKS.md, "What was changed for speed").
    """

    CHUNK_BYTES = 16 * 2**20

    def __init__(self, dim: int, hidden: int, bias: bool = False, approximate: str = "none",
                 linear: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.fc1 = linear(dim, hidden, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = linear(hidden, dim, bias=bias)
        self.inplace_act = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.inplace_act and type(self.act) is nn.GELU and not torch.is_grad_enabled()):
            return self.fc2(self.act(self.fc1(x)))
        rows = x.numel() // x.shape[-1]
        chunks = -(-rows * self.fc1.out_features * x.element_size() // self.CHUNK_BYTES)
        if chunks <= 1:
            return self._inplace(x)
        flat, step = x.reshape(rows, x.shape[-1]), -(-rows // chunks)
        out = torch.cat([self._inplace(flat[s:s + step]) for s in range(0, rows, step)])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _inplace(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.ops.aten.gelu_(self.fc1(x), approximate=self.act.approximate))


def swiglu_hidden_dim(dim: int, multiple_of: int, dim_multiplier: Optional[float] = None) -> int:
    """LlamaGen's hidden size: int(2/3 * 4 * dim), times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if dim_multiplier is not None:
        hidden = int(dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases; the linears keep a prepacked weight for CPU
    decoding (:class:`hieratok.nn.linear.Linear`)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate = Linear(dim, hidden, bias=False)
        self.up = Linear(dim, hidden, bias=False)
        self.down = Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))
