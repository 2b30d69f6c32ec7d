"""Structural attention masks: a sequence cut into consecutive blocks, plus one rule.

Every mask in the library has this structure. A :class:`MaskSpec` holds the block sizes and the
rule relating the block of a query to the block of a key:

- ``"causal"``: q sees the keys of its own block and of all earlier blocks (``block(q) >= block(k)``);
- ``"diagonal"``: q sees the keys of its own block only (``block(q) == block(k)``);
- ``"full"``: every query sees every key.

HieraTok's scale masks (section 3.2, eqs. 6-7) have one block of ``s*s`` tokens per scale:
scale-causal is ``causal``, scale-independent is ``diagonal`` (:meth:`MaskSpec.for_scales`).
ResTok's encoder mask is ``causal`` over ``[image stages coarse..fine, latent levels]``, HAR's
over its prediction groups, and plain next-token prediction is ``causal`` over blocks of one
(:meth:`MaskSpec.causal`).

From the spec come, without looking at any mask values (so without host syncs):

- :meth:`MaskSpec.dense`: the boolean (Lq, Lk) tensor, True where attention is allowed, for any
  range of query rows (a KV-cache step, or the last layer's needed rows);
- :meth:`MaskSpec.segments`: the query segments that SDPA runs one call each, each over the key
  range its rows use, with a sub-mask only where a segment spans several blocks;
- :meth:`MaskSpec.mask_mod`: the FlexAttention ``mask_mod`` for a block-sparse ``BlockMask``.

:func:`hieratok.nn.attention.resolve_mask` turns a spec into the form an attention backend runs.

Legend: L tokens, Lq query rows, Lk keys.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple, Optional, Sequence

import torch

__all__ = ["ATTENTION_MODES", "MASK_RULES", "MaskSpec", "Segment"]

MASK_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "causal": lambda bq, bk: bq >= bk,
    "diagonal": lambda bq, bk: bq == bk,
    "full": lambda bq, bk: torch.ones_like(bq >= bk),
}
# HieraTok's names for the rules over its scales
ATTENTION_MODES = ("scale_causal", "scale_independent", "full")
_MODE_RULE = {"scale_causal": "causal", "scale_independent": "diagonal", "full": "full"}


class Segment(NamedTuple):
    """Query rows ``q0:q1`` (relative to the first row asked for) attend to keys ``k0:k1`` only;
    ``masked`` is False where every one of those pairs is allowed."""

    q0: int
    q1: int
    k0: int
    k1: int
    masked: bool


@dataclass(frozen=True)
class MaskSpec:
    """A sequence of consecutive blocks of ``sizes`` tokens and the ``rule`` between blocks."""

    sizes: tuple[int, ...]
    rule: str = "causal"

    def __post_init__(self) -> None:
        sizes = tuple(int(n) for n in self.sizes)
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"mask block sizes must be positive, got {list(self.sizes)}")
        if self.rule not in MASK_RULES:
            raise ValueError(f"mask rule {self.rule!r} is not one of {tuple(MASK_RULES)}")
        object.__setattr__(self, "sizes", sizes)

    @classmethod
    def for_scales(cls, mode: str, scales: Sequence[int | tuple[int, int]]) -> "MaskSpec":
        """HieraTok's coarse-to-fine sequence: one block of s*s tokens per square scale s, of h*w per
        rectangular scale (h, w); ``mode`` one of :data:`ATTENTION_MODES`. The rule does not depend
        on the grid: a larger or rectangular pyramid only changes the block sizes."""
        if mode not in _MODE_RULE:
            raise ValueError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")
        return cls(tuple(s * s if isinstance(s, int) else s[0] * s[1] for s in scales), _MODE_RULE[mode])

    @classmethod
    def causal(cls, length: int) -> "MaskSpec":
        """Plain causal attention over ``length`` tokens (blocks of one)."""
        return cls((1,) * length, "causal")

    # ---- structure ------------------------------------------------------------------------------

    @cached_property
    def ends(self) -> tuple[int, ...]:
        """One past the last token of each block."""
        return tuple(itertools.accumulate(self.sizes))

    @property
    def length(self) -> int:
        return self.ends[-1]

    def block_of(self, token: int) -> int:
        return bisect.bisect_right(self.ends, token)

    def _key_range(self, block: int) -> tuple[int, int]:
        """Keys ``[k0, k1)`` the queries of ``block`` see (all of them allowed)."""
        if self.rule == "full":
            return 0, self.length
        start = self.ends[block - 1] if block else 0
        return (0 if self.rule == "causal" else start), self.ends[block]

    def _rows(self, q0: int, q1: Optional[int]) -> tuple[int, int]:
        q1 = self.length if q1 is None else q1
        if not 0 <= q0 < q1 <= self.length:
            raise ValueError(f"query rows [{q0}, {q1}) are outside the mask's {self.length} tokens")
        return q0, q1

    def key_end(self, q0: int = 0, q1: Optional[int] = None) -> int:
        """One past the last key any query in ``[q0, q1)`` sees: the keys a cached step needs."""
        q0, q1 = self._rows(q0, q1)
        return self._key_range(self.block_of(q1 - 1))[1]

    def sees_all_keys(self, q0: int = 0, q1: Optional[int] = None) -> bool:
        """Whether every query in ``[q0, q1)`` sees every key in ``[0, key_end)`` (no mask needed)."""
        q0, q1 = self._rows(q0, q1)
        if self.rule == "full":
            return True
        b0, b1 = self.block_of(q0), self.block_of(q1 - 1)
        return b0 == b1 and self._key_range(b1)[0] == 0

    def allowed_fraction(self) -> float:
        """Fraction of the L*L query-key pairs the rule allows (about 0.80 for scale-causal on [1,2,4,8,16])."""
        L = self.length
        if self.rule == "full":
            return 1.0
        if self.rule == "diagonal":
            return sum(n * n for n in self.sizes) / L ** 2
        return sum(n * e for n, e in zip(self.sizes, self.ends)) / L ** 2

    # ---- forms ----------------------------------------------------------------------------------

    def ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Block index of every token, shape (L,)."""
        sizes = torch.tensor(self.sizes, dtype=torch.long, device=device)
        return torch.repeat_interleave(torch.arange(len(self.sizes), device=device), sizes, output_size=self.length)

    def dense(self, device: torch.device | str | None = None, q0: int = 0, q1: Optional[int] = None,
              k1: Optional[int] = None) -> torch.Tensor:
        """Boolean mask of the query rows ``[q0, q1)`` over the keys ``[0, k1)`` (default: all), True
        where attention is allowed."""
        q0, q1 = self._rows(q0, q1)
        ids = self.ids(device)
        return MASK_RULES[self.rule](ids[q0:q1, None], ids[None, :k1])

    def mask_mod(self, device: torch.device | str | None = None, q_offset: int = 0) -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the same rule; query ``q_idx`` is token
        ``q_offset + q_idx``."""
        ids, rule = self.ids(device), MASK_RULES[self.rule]

        def _mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - signature fixed by FlexAttention
            return rule(ids[q_idx + q_offset], ids[kv_idx])

        return _mod

    def segments(self, q0: int = 0, q1: Optional[int] = None, merge_queries: int = 128) -> tuple[Segment, ...]:
        """Query segments of the rows ``[q0, q1)``, each over the key range its rows see.

        Consecutive blocks form runs of queries with one key range; neighbouring runs are merged
        while the merged segment has at most ``merge_queries`` queries (a masked call on a small
        block costs less than several tiny calls). A segment needs a mask only when it spans
        more than one block. For the scale-causal mask on [1, 2, 4, 8, 16] this gives two segments:
        the 85 coarse queries over the first 85 keys (masked) and the 256 finest over all 341.
        """
        q0, q1 = self._rows(q0, q1)
        if self.rule == "full":
            return (Segment(0, q1 - q0, 0, self.length, False),)
        runs = []  # (first row, one past the last row, block) per block the rows touch
        for b in range(self.block_of(q0), self.block_of(q1 - 1) + 1):
            start = self.ends[b - 1] if b else 0
            runs.append((max(start, q0), min(self.ends[b], q1), b))
        groups = [[runs[0]]]
        for run in runs[1:]:
            if run[1] - groups[-1][0][0] > merge_queries:
                groups.append([run])
            else:
                groups[-1].append(run)
        out = []
        for g in groups:
            k0 = min(self._key_range(b)[0] for *_, b in g)
            k1 = max(self._key_range(b)[1] for *_, b in g)
            out.append(Segment(g[0][0] - q0, g[-1][1] - q0, k0, k1, len(g) > 1))
        return tuple(out)
