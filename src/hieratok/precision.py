"""Inference precision: one switch for ``sample``, ``eval recon``, ``eval latents`` and ``cache-latents``.

    prec = resolve_precision("bf16", device)      # validates; warns where bf16 is emulated (slow)
    with inference_precision(prec, device):       # around the tokenizer / generator calls only
        images = tok.detokenize(z)

- ``fp32``: float32 arithmetic; on CUDA with TF32 switched off for matmuls and convolutions
  (cuDNN allows TF32 convolutions by default). The default on CPU.
- ``tf32``: float32 tensors, matmuls and convolutions on TF32 tensor cores (10-bit mantissa
  products, float32 sums). The default on CUDA, as DiT's ``sample.py`` sets ``allow_tf32``. On a
  CPU there is no TF32: it runs as ``fp32`` (with a warning).
- ``bf16`` / ``fp16``: ``torch.autocast`` (matmuls and convolutions in 16 bits, reductions and
  norms in float32). On a CPU without native bf16 (AVX512-BF16 / AMX) bf16 is emulated and slow;
  it is allowed, with a warning. fp16 can overflow (max 65504) where bf16 cannot.

Metric networks (Inception, LPIPS, the perceptual trunks) run outside this context; Inception
also forces exact float32 itself (:func:`exact_fp32`), so FID / IS / sFID are comparable across
precisions.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch

from .machine import cpu_flags

__all__ = ["PRECISIONS", "default_precision", "native_on_cpu", "resolve_precision", "inference_precision",
           "exact_fp32"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def default_precision(device: str | torch.device) -> str:
    """``tf32`` on CUDA, ``fp32`` elsewhere."""
    return "tf32" if torch.device(device).type == "cuda" else "fp32"


def native_on_cpu(name: str, flags: Optional[frozenset[str]] = None) -> Optional[bool]:
    """Whether the CPU computes the 16-bit format ``name`` (``bf16`` / ``fp16``) in hardware
    (AVX512-BF16 or AMX-BF16; AVX512-FP16 or AMX-FP16); None for the formats that need no such
    instructions. ``flags``: a :func:`hieratok.machine.cpu_flags` set (default: this CPU's)."""
    if name not in _NATIVE_CPU_FLAGS:
        return None
    have = cpu_flags() if flags is None else flags
    return any(f in have for f in _NATIVE_CPU_FLAGS[name])


def resolve_precision(name: Optional[str], device: str | torch.device) -> str:
    """The precision to run: ``name`` (checked), or the device's default when ``None``.

    Warns when the device emulates the requested mode (TF32 on a CPU runs as fp32; bf16 / fp16 on a
    CPU without the native instructions are several times slower than fp32, but still run).

    Raises:
        ValueError: ``name`` is not one of :data:`PRECISIONS`.
    """
    dev = torch.device(device)
    if name is None:
        return default_precision(dev)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if dev.type == "cpu" and name == "tf32":
        log.warning("--precision tf32: TF32 is a CUDA tensor-core mode; on the CPU this runs as fp32")
    elif dev.type == "cpu" and name in _NATIVE_CPU_FLAGS:
        if not native_on_cpu(name):
            log.warning("--precision %s on a CPU without native %s (%s; ATen capability %s): emulated, usually "
                        "slower than fp32", name, name, " / ".join(_NATIVE_CPU_FLAGS[name]).upper(),
                        torch.backends.cpu.get_cpu_capability())
    return name


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextlib.contextmanager
def inference_precision(name: Optional[str], device: str | torch.device) -> Iterator[None]:
    """Run the model calls inside in precision ``name`` (``None``: the device default) on ``device``.

    The TF32 switches are process-wide and restored on exit; autocast is local to the block.
    """
    dev = torch.device(device)
    name = name or default_precision(dev)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    with contextlib.ExitStack() as stack:
        if dev.type == "cuda":
            stack.enter_context(_tf32(name != "fp32"))  # bf16/fp16: the float32 ops left keep the fast default
        if name in _AUTOCAST:
            stack.enter_context(torch.autocast(dev.type, dtype=_AUTOCAST[name]))
        yield


@contextlib.contextmanager
def exact_fp32(device: str | torch.device) -> Iterator[None]:
    """Plain float32 inside, whatever the caller set: autocast off and (CUDA) TF32 off. For metric networks."""
    dev = torch.device(device)
    with contextlib.ExitStack() as stack:
        if dev.type == "cuda":
            stack.enter_context(_tf32(False))
        stack.enter_context(torch.autocast(dev.type, enabled=False))
        yield
