"""A linear layer that, for CPU inference, keeps its weight prepacked for MKL's gemm.

On CPU, float32 ``F.linear`` calls the BLAS gemm with the plain (out, in) weight, which the
library repacks into its blocked layout on every call. For decoding (a handful to a few
hundred rows per call, weights far larger than the cache) that repacking dominates; with a
prepacked weight the gemm runs at the memory bandwidth instead (measured per CPU in BENCHMARKS.md).

:class:`Linear` packs its weight once (``torch.ops.mkl._mkl_reorder_linear_weight``, MKL's
``cblas_sgemm_pack``: what Inductor's CPU weight prepacking uses) when it is first called in eval
mode without autograd or autocast on a CPU float32 input, and calls ``torch.ops.mkl._mkl_linear``
with it. The pack is dropped by ``train()`` (optimizers such as fused AdamW update weights in
place without moving their version counter) and redone whenever the weight changes (its storage
or version counter); it is checked on creation against ``F.linear`` on a few rows. ``fast = False``
is the reference path (``F.linear``; the pack is kept for when the fast path comes back,
:meth:`Linear.release_pack` frees it). Training mode, autograd, autocast, other devices and
dtypes, and builds without MKL always take ``F.linear``. Same
parameters and state dict as :class:`torch.nn.Linear`; results agree up to float rounding
(tests/nn/test_linear.py). The pack costs memory (about 1.7x the weight).

Legend: M rows (all leading axes of the input flattened).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "pack_weight", "packed_linear", "mkl_packing_available"]

PACK_ROWS_HINT = 512  # the row count MKL is told at packing time; the pack serves any M


def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed sgemm ops."""
    try:
        return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
                and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without MKL
        return False


_MKL = mkl_packing_available()


def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the prepacked weight (CPU, float32, no autograd)."""
    rows = x.numel() // x.shape[-1]
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)  # rows == the batch hint: the packed gemm


def pack_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """MKL-packed copy of a (out, in) float32 CPU weight, or None where packing is unavailable or
    does not reproduce ``F.linear`` on a probe (then callers keep ``F.linear``)."""
    if not _MKL or weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.ndim != 2:
        return None
    with torch.no_grad():
        w = weight.detach().contiguous()
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS_HINT)
        probe = torch.linspace(-1.0, 1.0, 3 * w.shape[1]).view(3, -1)
        ref = F.linear(probe, w)
        if not torch.allclose(packed_linear(probe, packed, w), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-12):
            return None
    return packed


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` with a prepacked-weight CPU inference path (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw: object) -> None:
        super().__init__(in_features, out_features, bias, **kw)
        self.fast = True
        self._pack: Optional[torch.Tensor] = None
        self._pack_key: Optional[tuple] = None

    def _packed(self) -> Optional[torch.Tensor]:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if key != self._pack_key:
            self._pack, self._pack_key = pack_weight(w), key
        return self._pack

    def release_pack(self) -> None:
        """Free the packed weight (it is rebuilt on the next fast call)."""
        self._pack = self._pack_key = None

    def train(self, mode: bool = True) -> "Linear":
        if mode:
            self.release_pack()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference tensors (a model built or loaded under torch.inference_mode) have no version
        # counter to tell a stale pack from a fresh one: they take the plain path
        if (self.fast and _MKL and not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
                and not self.weight.is_inference()):
            packed = self._packed()
            if packed is not None:
                return packed_linear(x, packed, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
