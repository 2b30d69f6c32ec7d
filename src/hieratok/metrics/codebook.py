"""Codebook statistics of quantized tokenizers: usage, entropy, perplexity.

From the empirical code distribution ``p_k = count_k / total`` over a codebook of size K:

* usage: fraction of codes used at least once, ``#{k: count_k > 0} / K``;
* entropy ``H = -sum_k p_k log p_k`` in nats and bits;
* perplexity ``exp(H)``: the effective number of equally used codes (K for uniform use);
* normalised entropy ``H / log K`` (1 for uniform use);
* shared positions (:func:`shared_code_fraction`): the fraction of sequence positions at which
  every image of a batch has the same code. 1.0 means the codes say nothing about the image,
  however many codes the histogram shows in use.

:class:`CodebookUsage` accumulates counts as an int64 histogram, so it streams over any number
of batches and adds across processes (:meth:`CodebookUsage.all_reduce_`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["CodebookStats", "CodebookUsage", "codebook_stats", "shared_code_fraction"]


@dataclass(frozen=True)
class CodebookStats:
    """Summary of a code histogram (see the module docstring for definitions)."""

    codebook_size: int
    num_tokens: int
    num_used: int
    usage: float
    entropy_nats: float
    entropy_bits: float
    perplexity: float
    normalized_entropy: float

    def as_dict(self) -> dict:
        return asdict(self)


class CodebookUsage:
    """Streaming histogram of code indices.

    Args:
        codebook_size: K; indices must lie in ``[0, K)``.
        device: where the counts live (default CPU; put them next to the indices to avoid syncs).
    """

    def __init__(self, codebook_size: int, device: torch.device | str | None = None) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.int64, device=device)

    def update(self, indices: torch.Tensor, check: bool = True) -> "CodebookUsage":
        """Count a tensor of code indices of any shape. ``check=False`` skips the range check, which
        reads the indices back to the host (a GPU sync): for indices a quantizer produced."""
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.is_floating_point():
            raise TypeError(f"indices must be an integer tensor, got {idx.dtype}")
        if check and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        self.counts += torch.bincount(idx.to(self.counts.device, torch.int64), minlength=self.codebook_size)
        return self

    def merge(self, other: "CodebookUsage") -> "CodebookUsage":
        """Add another histogram (same codebook size) into this one."""
        if other.codebook_size != self.codebook_size:
            raise ValueError(f"codebook sizes differ: {other.codebook_size} vs {self.codebook_size}")
        self.counts += other.counts.to(self.counts.device)
        return self

    def all_reduce_(self, group=None) -> "CodebookUsage":
        """Sum the counts over ranks when ``torch.distributed`` is initialised (collective; no-op otherwise)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        return self

    def reset(self) -> None:
        self.counts.zero_()

    def compute(self) -> CodebookStats:
        """Statistics of everything counted so far."""
        return codebook_stats(self.counts)


def codebook_stats(counts: torch.Tensor) -> CodebookStats:
    """Statistics of a code histogram ``(K,)`` (counts or unnormalised frequencies)."""
    c = torch.as_tensor(counts).detach().to("cpu", torch.float64).reshape(-1)
    k = c.numel()
    total = float(c.sum())
    if total <= 0:
        raise ValueError("no codes counted")
    p = c / total
    nz = p[p > 0]
    h = float(-(nz * nz.log()).sum())
    return CodebookStats(
        codebook_size=k,
        num_tokens=int(round(total)),
        num_used=int((c > 0).sum()),
        usage=float((c > 0).sum()) / k,
        entropy_nats=h,
        entropy_bits=h / math.log(2),
        perplexity=math.exp(h),
        normalized_entropy=h / math.log(k) if k > 1 else 1.0,
    )


def shared_code_fraction(indices_BN: torch.Tensor) -> torch.Tensor:
    """Fraction of positions n at which all B sequences have the same code (0-d float tensor on
    the indices' device; no host read). Needs B >= 2: with one sequence every position is shared."""
    if indices_BN.ndim != 2 or indices_BN.shape[0] < 2:
        raise ValueError(f"need code indices of shape (B >= 2, N), got {tuple(indices_BN.shape)}")
    return (indices_BN == indices_BN[:1]).all(dim=0).float().mean()
