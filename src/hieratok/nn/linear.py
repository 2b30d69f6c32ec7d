"""A linear layer that, for CPU inference, keeps its weight prepacked for the gemm library.

On CPU, float32 ``F.linear`` calls the BLAS gemm with the plain (out, in) weight, which the
library repacks into its blocked layout on every call. For decoding (a handful to a few
hundred rows per call, weights far larger than the cache) that repacking dominates; with a
prepacked weight the gemm runs at the memory bandwidth instead (measured per CPU in BENCHMARKS.md).

Two packed gemms exist in torch's CPU builds, and which is faster depends on the CPU (measured:
on an AMD EPYC without AVX512, oneDNN's runs 8-row decoding gemms 2-2.7x faster than MKL's packed
sgemm and 10-15% faster at a few thousand rows; on Intel MKL's was the faster one):

- ``"mkl"``: ``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear`` (MKL's
  ``cblas_sgemm_pack``), what Inductor's CPU weight prepacking uses on MKL builds;
- ``"onednn"``: ``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the oneDNN
  inner product Inductor uses elsewhere.

:func:`packed_backend` picks one per process: ``$HIERATOK_PACKED_LINEAR`` (``mkl``, ``onednn``, or
``off`` for ``F.linear`` everywhere), else the faster of the available ones and ``F.linear`` on a
decoding-sized probe timed at first use (a few ms).

:class:`Linear` packs its weight once when it is first called in eval mode without autograd or
autocast on a CPU float32 input. The pack is dropped by ``train()`` (optimizers such as fused AdamW
update weights in place without moving their version counter) and redone whenever the weight
changes (its storage or version counter); it is checked on creation against ``F.linear`` on a few
rows. ``fast = False`` is the reference path (``F.linear``; the pack is kept for when the fast path
comes back, :meth:`Linear.release_pack` frees it). Training mode, autograd, autocast, other devices
and dtypes always take ``F.linear``. Same parameters and state dict as :class:`torch.nn.Linear`;
results agree up to float rounding (tests/nn/test_linear.py). The pack costs memory (about 1.7x
the weight for MKL's, 1x for oneDNN's).

Legend: M rows (all leading axes of the input flattened).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "pack_weight", "packed_linear", "packed_backend", "available_backends", "PACKED_BACKENDS"]

log = logging.getLogger(__name__)

PACK_ROWS_HINT = 512  # the row count MKL is told at packing time; the pack serves any M
PACKED_BACKENDS = ("mkl", "onednn")
ENV = "HIERATOK_PACKED_LINEAR"


def _has_ops(namespace: str, *names: str) -> bool:
    try:
        ns = getattr(torch.ops, namespace)
        return all(hasattr(ns, n) for n in names)
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without the library
        return False


def available_backends() -> tuple[str, ...]:
    """The packed gemms this torch build has."""
    out = []
    if torch.backends.mkl.is_available() and _has_ops("mkl", "_mkl_linear", "_mkl_reorder_linear_weight"):
        out.append("mkl")
    if torch.backends.mkldnn.is_available() and _has_ops("mkldnn", "_linear_pointwise", "_reorder_linear_weight"):
        out.append("onednn")
    return tuple(out)


def _pack(weight: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS_HINT)
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def packed_linear(x: torch.Tensor, packed: tuple[str, torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through a packed weight ``(backend, pack)`` (CPU, float32, no autograd)."""
    backend, pack = packed
    if backend == "mkl":
        rows = x.numel() // x.shape[-1]
        return torch.ops.mkl._mkl_linear(x, pack, weight, bias, rows)  # rows == the batch hint: the packed gemm
    return torch.ops.mkldnn._linear_pointwise(x, pack, bias, "none", [], "")


def _time_backend(backend: Optional[str], x: torch.Tensor, w: torch.Tensor, reps: int = 15) -> float:
    with torch.no_grad():
        packed = None if backend is None else (backend, _pack(w, backend))
        run = (lambda: F.linear(x, w)) if packed is None else (lambda: packed_linear(x, packed, w))
        run()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2]


_CHOICE: dict[str, Optional[str]] = {}


def packed_backend() -> Optional[str]:
    """The packed gemm this process uses (None: ``F.linear`` everywhere), chosen once: from
    ``$HIERATOK_PACKED_LINEAR`` when set, else the fastest of the available backends and
    ``F.linear`` on a decoding-sized probe (8 rows x 1024 x 1024)."""
    if "choice" not in _CHOICE:
        avail, want = available_backends(), os.environ.get(ENV, "").strip().lower()
        if want in ("off", "none", "plain"):
            choice = None
        elif want:
            if want not in avail:
                raise ValueError(f"${ENV}={want!r}: this torch build offers {list(avail) or 'no packed gemm'} (or 'off')")
            choice = want
        elif not avail:
            choice = None
        else:
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(8, 1024, generator=g), torch.randn(1024, 1024, generator=g)
            times = {b: _time_backend(b, x, w) for b in (None, *avail)}
            choice = min(times, key=lambda b: times[b])
            log.debug("packed linear probe (s): %s -> %s", {str(k): round(v, 6) for k, v in times.items()}, choice)
        _CHOICE["choice"] = choice
    return _CHOICE["choice"]


def pack_weight(weight: torch.Tensor, backend: Optional[str] = None) -> Optional[tuple[str, torch.Tensor]]:
    """A packed copy ``(backend, pack)`` of a (out, in) float32 CPU weight (``backend`` None: the
    process's :func:`packed_backend`), or None where packing is unavailable or does not reproduce
    ``F.linear`` on a probe (then callers keep ``F.linear``)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.ndim != 2:
        return None
    backend = packed_backend() if backend is None else backend
    if backend is None or backend not in available_backends():
        return None
    with torch.no_grad():
        w = weight.detach().contiguous()
        packed = (backend, _pack(w, backend))
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
        self._pack: Optional[tuple[str, torch.Tensor]] = None
        self._pack_key: Optional[tuple] = None

    def _packed(self) -> Optional[tuple[str, torch.Tensor]]:
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
        if (self.fast and not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
                and not self.weight.is_inference()):
            packed = self._packed()
            if packed is not None:
                return packed_linear(x, packed, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
