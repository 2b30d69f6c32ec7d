"""Facts about the machine a result was measured on (recorded with every benchmark and ablation),
and the one process setting that CPU training needs from it.

The CPU (model, the instruction-set flags that decide how fast fp32 / bf16 / fp16 run) and the
math libraries behind torch and NumPy (which BLAS, which MKL and oneDNN versions);
:func:`keep_freed_memory` stops glibc from handing the memory of freed tensors back to the kernel.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from typing import Any, Mapping, Optional

import numpy
import torch

__all__ = ["ISA_FLAGS", "cpu_model", "cpu_flags", "isa_flags", "torch_build_facts", "parse_torch_build",
           "numpy_blas", "parse_numpy_blas", "keep_freed_memory"]

# the flags (as /proc/cpuinfo names them) that decide the fast paths of fp32 / bf16 / fp16 / int8 matmuls
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "avx_vnni")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``, e.g. ``avx512_bf16``, ``amx_bf16``); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa_flags(flags: Optional[frozenset[str]] = None) -> list[str]:
    """The flags of :data:`ISA_FLAGS` this CPU has (``flags``: a :func:`cpu_flags` set; default this CPU's)."""
    have = cpu_flags() if flags is None else flags
    return [f for f in ISA_FLAGS if f in have]


def parse_torch_build(text: str) -> dict[str, Optional[str]]:
    """BLAS, LAPACK, MKL and oneDNN of a torch build, from the text of ``torch.__config__.show()``.

    Returns ``{"blas", "lapack", "mkl", "onednn"}``: the ``BLAS_INFO`` / ``LAPACK_INFO`` build
    settings (e.g. ``mkl``, ``open``, ``accelerate``) and the MKL / MKL-DNN (oneDNN) version
    numbers; None for whatever the text does not name.
    """
    def find(pattern: str) -> Optional[str]:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    return {"blas": find(r"\bBLAS_INFO=([^,\s]+)"), "lapack": find(r"\bLAPACK_INFO=([^,\s]+)"),
            "mkl": find(r"Math Kernel Library Version (\d[\w.]*)"),
            "onednn": find(r"(?:MKL-DNN|oneDNN) v?(\d[\d.]*\d)")}


def torch_build_facts() -> dict[str, Optional[str]]:
    """:func:`parse_torch_build` of the running torch."""
    return parse_torch_build(torch.__config__.show())


def parse_numpy_blas(config: Mapping[str, Any]) -> Optional[str]:
    """``"name version"`` of the BLAS in a NumPy build configuration (``numpy.__config__.CONFIG``,
    NumPy >= 1.26), e.g. ``"scipy-openblas 0.3.27"``; None where it names none."""
    blas = config.get("Build Dependencies", {}).get("blas") or {}
    name = blas.get("name")
    if not name or blas.get("found") is False:
        return None
    version = blas.get("version")
    return f"{name} {version}" if version and version != "unknown" else str(name)


def numpy_blas() -> Optional[str]:
    """:func:`parse_numpy_blas` of the installed NumPy (None before NumPy 1.26, which kept no such record)."""
    config = getattr(getattr(numpy, "__config__", None), "CONFIG", None)
    return parse_numpy_blas(config) if isinstance(config, Mapping) else None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT: Optional[bool] = None  # the outcome of the first keep_freed_memory() call in this process


def keep_freed_memory() -> bool:
    """Keep the memory of freed tensors in this process for the next step instead of returning it
    to the kernel (glibc only; process-wide, once; returns whether it is in effect).

    By default glibc serves allocations above a moving threshold (128 KiB to 32 MiB) with fresh
    ``mmap`` pages and trims the heap once it has more than twice that free. A CPU training step
    frees its activations in the backward pass and allocates them again in the next forward, so
    every step pays the kernel to zero those pages again: measured 20-60 thousand page faults and
    35-150 ms of system time per step of the demo (0.5-0.65 s), 4-6 thousand per step of ``tiny``.
    Here allocations below 1 GiB (32 MiB where a glibc refuses more) come from the heap and the
    heap is never trimmed, so a run's resident memory stays at its peak (about 4% above the
    default's, measured) and a step faults no page. The arithmetic does not change.

    Does nothing (False) on other C libraries (musl, macOS, Windows), and where the user set glibc's
    own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables (their choice
    stands).
    """
    global _KEPT
    if _KEPT is None:
        _KEPT = False
        user_set = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not user_set:
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # a fixed mmap threshold also turns off glibc's moving one (which would reset the trim one)
            mmap_set = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            _KEPT = bool(mmap_set) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _KEPT
