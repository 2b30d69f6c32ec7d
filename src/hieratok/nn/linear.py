"""A linear layer with a CPU fast path for few rows (token-by-token and group-by-group decoding).

On CPU, float32 ``F.linear`` calls the BLAS gemm, which for a handful of rows (M <= 64: a
decoding step of a batch with classifier-free guidance) reaches neither the memory-bandwidth
nor the compute bound: on a 2-core AVX-512 machine M = 8 rows of a 1024 -> 3072 layer run at
about 40 GFLOP/s, oneDNN's matmul at about 58. :class:`Linear` sends such calls to oneDNN
(``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor uses for CPU linears) when no
gradient is recorded; everything else, and ``fast = False`` (the reference path), is
``F.linear``. Same parameters and state dict as :class:`torch.nn.Linear`; results agree up to
float rounding (tests/har/test_gpt_fast_paths.py).

Legend: M rows (all leading axes of the input flattened).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear", "SMALL_ROWS"]

SMALL_ROWS = 64  # at most this many rows take the oneDNN path


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


_ONEDNN = _onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fast: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; CPU float32 inference with at most :data:`SMALL_ROWS` rows uses oneDNN."""
    if (fast and _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() <= SMALL_ROWS * x.shape[-1] and x.numel() > 0
            and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` whose forward is :func:`linear` (``fast = False``: plain ``F.linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw: object) -> None:
        super().__init__(in_features, out_features, bias, **kw)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.fast)
