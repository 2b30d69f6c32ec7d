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
comes back, :meth:`Linear.release_pack` frees it). Under CPU autocast (bf16 / fp16 inference) the
layer keeps its weight cast to the autocast dtype, under the same rules, instead of letting autocast
cast it on every call, and packs a bf16 one where oneDNN's packed bf16 gemm measures faster
(:func:`packed_backend` per dtype). Without a pack the result is bit for bit autocast's own; with
one it agrees to bf16 rounding of the output. Training mode, autograd, other devices and dtypes
always take ``F.linear``. Same parameters and state dict as :class:`torch.nn.Linear`;
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
    """``F.linear(x, weight, bias)`` through a packed weight ``(backend, pack)`` (CPU, no autograd;
    float32, or bfloat16 ``x`` / ``bias`` with a oneDNN pack of a bfloat16 weight)."""
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
# the packed gemms of each weight dtype: MKL packs float32 only; oneDNN packs bfloat16 too
# (its bf16 inner product, for CPU autocast inference)
DTYPE_BACKENDS = {torch.float32: PACKED_BACKENDS, torch.bfloat16: ("onednn",)}


def packed_backend(dtype: torch.dtype = torch.float32) -> Optional[str]:
    """The packed gemm this process uses for ``dtype`` weights (None: ``F.linear``), chosen once per
    dtype: from ``$HIERATOK_PACKED_LINEAR`` when set, else the fastest of the available backends and
    ``F.linear`` on a decoding-sized probe (8 rows x 1024 x 1024 in that dtype). A backend that
    fails on the probe (e.g. bf16 on a build or CPU without it) is not chosen."""
    key = str(dtype)
    if key not in _CHOICE:
        avail, want = available_backends(), os.environ.get(ENV, "").strip().lower()
        usable = tuple(b for b in avail if b in DTYPE_BACKENDS.get(dtype, ()))
        if want in ("off", "none", "plain"):
            choice = None
        elif want:
            if want not in avail:
                raise ValueError(f"${ENV}={want!r}: this torch build offers {list(avail) or 'no packed gemm'} (or 'off')")
            choice = want if want in usable else None
        elif not usable:
            choice = None
        else:
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(8, 1024, generator=g).to(dtype), torch.randn(1024, 1024, generator=g).to(dtype)
            times = {}
            for b in (None, *usable):
                try:
                    times[b] = _time_backend(b, x, w)
                except RuntimeError:  # this backend cannot run this dtype here
                    pass
            choice = min(times, key=lambda b: times[b])
            log.debug("packed linear probe, %s (s): %s -> %s", dtype,
                      {str(k): round(v, 6) for k, v in times.items()}, choice)
        _CHOICE[key] = choice
    return _CHOICE[key]


def pack_weight(weight: torch.Tensor, backend: Optional[str] = None) -> Optional[tuple[str, torch.Tensor]]:
    """A packed copy ``(backend, pack)`` of a (out, in) float32 or bfloat16 CPU weight (``backend``
    None: the process's :func:`packed_backend` for that dtype), or None where packing is
    unavailable or does not reproduce ``F.linear`` on a probe (then callers keep ``F.linear``)."""
    if weight.device.type != "cpu" or weight.dtype not in DTYPE_BACKENDS or weight.ndim != 2:
        return None
    backend = packed_backend(weight.dtype) if backend is None else backend
    if backend is None or backend not in available_backends() or backend not in DTYPE_BACKENDS[weight.dtype]:
        return None
    # a float32 pack agrees with F.linear to float32 rounding; a bf16 one to bf16 rounding of the output
    rtol = 1e-4 if weight.dtype == torch.float32 else 2 ** -7
    with torch.no_grad():
        w = weight.detach().contiguous()
        try:
            packed = (backend, _pack(w, backend))
            probe = torch.linspace(-1.0, 1.0, 3 * w.shape[1]).view(3, -1).to(w.dtype)
            ref, got = F.linear(probe, w).float(), packed_linear(probe, packed, w).float()
        except RuntimeError:
            return None
        if not torch.allclose(got, ref, rtol=rtol, atol=rtol * 0.1 * float(ref.abs().max()) + 1e-12):
            return None
    return packed


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` with a prepacked-weight CPU inference path (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw: object) -> None:
        super().__init__(in_features, out_features, bias, **kw)
        self.fast = True
        # per compute dtype: (key of the weight it was made from, pack or None, the weight cast to
        # that dtype where there is no pack); float32 for plain inference, bf16 / fp16 under autocast
        self._packs: dict[torch.dtype, tuple[tuple, Optional[tuple[str, torch.Tensor]], Optional[torch.Tensor]]] = {}

    def _prepared(self, dtype: torch.dtype) -> tuple[Optional[tuple[str, torch.Tensor]], Optional[torch.Tensor]]:
        """The pack of the weight in ``dtype`` (None where none applies) and, without a pack, the
        weight cast to ``dtype`` (None for float32: the weight itself); remade when the weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, tuple(w.shape))
        if dtype not in self._packs or self._packs[dtype][0] != key:
            cast = w.detach().to(dtype)  # the weight itself for float32
            pack = pack_weight(cast)
            self._packs[dtype] = (key, pack, cast if pack is None and dtype != torch.float32 else None)
        return self._packs[dtype][1], self._packs[dtype][2]

    @property
    def _pack(self) -> Optional[tuple[str, torch.Tensor]]:
        """The float32 pack made so far (None: not made yet, or none applies)."""
        entry = self._packs.get(torch.float32)
        return None if entry is None else entry[1]

    def release_pack(self) -> None:
        """Free the packed weights and the autocast-dtype copies (rebuilt on the next fast call)."""
        self._packs = {}

    def train(self, mode: bool = True) -> "Linear":
        if mode:
            self.release_pack()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference tensors (a model built or loaded under torch.inference_mode) have no version
        # counter to tell a stale pack from a fresh one: they take the plain path
        if (self.fast and not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.numel() > 0 and self.weight.dtype == torch.float32 and not self.weight.is_inference()):
            if not torch.is_autocast_enabled("cpu"):
                packed = self._prepared(torch.float32)[0] if x.dtype == torch.float32 else None
                if packed is not None:
                    return packed_linear(x, packed, self.weight, self.bias)
            else:
                # autocast would cast the float32 weight on every call (most of a bf16 decoding
                # step's time); the cast is kept instead, packed where the CPU's bf16 gemm is faster
                # packed. Without a pack, F.linear under autocast casts x and the bias as before and
                # leaves the kept weight alone: bit for bit autocast's own result
                dtype = torch.get_autocast_dtype("cpu")
                packed, cast = self._prepared(dtype)
                if packed is not None:
                    bias = None if self.bias is None else self.bias.to(dtype)
                    return packed_linear(x.to(dtype), packed, self.weight, bias)
                return F.linear(x, cast, self.bias)
        return F.linear(x, self.weight, self.bias)
