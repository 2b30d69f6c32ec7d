"""A distributed sampler that can resume in the middle of an epoch.

Index layout is exactly ``torch.utils.data.DistributedSampler``'s: a permutation from a
generator seeded with ``seed + epoch`` (or ``range(n)``), padded by repeating its head to a
multiple of ``num_replicas`` (or truncated with ``drop_last``), and rank ``r`` takes every
``num_replicas``-th index starting at ``r``. Ranks therefore see disjoint shards whose union is
the whole dataset.

Resuming: the sampler records how many samples *all ranks together* have consumed in the
current epoch. The training loop reports progress with :meth:`advance` after each step (the
sampler cannot count by itself, because DataLoader workers prefetch indices ahead of use);
:meth:`state_dict` goes into the checkpoint and :meth:`load_state_dict` restores it, after which
iteration continues with exactly the indices that had not been consumed. Because the count is
global, a run may also resume with a different number of ranks: the remaining indices are
re-dealt over the new ranks, so no sample of the epoch is repeated or lost.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterator, Optional, Sequence, Sized, Union

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ResumableDistributedSampler", "BucketBatchSampler"]

logger = logging.getLogger(__name__)


class ResumableDistributedSampler(Sampler[int]):
    """Disjoint per-rank index shards with a mid-epoch resumable position.

    Args:
        dataset: a sized dataset, or its length as an int.
        num_replicas: number of ranks; defaults to the initialised process group's world size (or 1).
        rank: this rank; defaults to the process group's rank (or 0).
        shuffle: permute indices every epoch (seeded by ``seed + epoch``).
        seed: shuffling seed; must be identical on every rank.
        drop_last: drop the tail so every rank gets the same number of samples without padding
            (otherwise the head of the permutation is repeated as padding).

    Example::

        sampler = ResumableDistributedSampler(dataset, shuffle=True, seed=0)
        sampler.load_state_dict(ckpt["sampler"])            # optional, when resuming
        for epoch in range(sampler.epoch, num_epochs):
            sampler.set_epoch(epoch)                         # keeps the position if epoch is unchanged
            for batch in DataLoader(dataset, batch_size=bs, sampler=sampler):
                train_step(batch)
                sampler.advance(len(batch[0]))               # samples this rank consumed
                ckpt["sampler"] = sampler.state_dict()
    """

    def __init__(
        self,
        dataset: Union[Sized, int],
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        length = dataset if isinstance(dataset, int) else len(dataset)
        if length <= 0:
            raise ValueError(f"cannot sample from an empty dataset (length {length})")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
        if drop_last and length < num_replicas:
            raise ValueError(
                f"drop_last with {length} samples and {num_replicas} ranks leaves every rank empty"
            )
        self.length = length
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        # Samples consumed in this epoch by all ranks together, as reported by advance().
        self.consumed = 0
        # Position the next iteration starts from (fixed between set_epoch/load_state_dict calls).
        self._start = 0

    @property
    def start(self) -> int:
        """Samples of the current epoch (all ranks together) consumed before the next iteration starts."""
        return self._start

    @property
    def total_size(self) -> int:
        """Padded (or truncated) epoch size over all ranks at the current world size."""
        if self.drop_last:
            return (self.length // self.num_replicas) * self.num_replicas
        return -(-self.length // self.num_replicas) * self.num_replicas

    def _epoch_order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(self.length, generator=g).tolist()
        return list(range(self.length))

    def _remaining_global(self) -> list[int]:
        """Indices not yet consumed this epoch, padded/truncated to a multiple of num_replicas."""
        order = self._epoch_order()
        start = min(self._start, self.length)
        remaining = order[start:]
        if self.drop_last:
            keep = (len(remaining) // self.num_replicas) * self.num_replicas
            return remaining[:keep]
        pad = -len(remaining) % self.num_replicas
        if pad:
            # Pad from the head of the permutation, like DistributedSampler.
            reps = -(-pad // len(order))
            remaining = remaining + (order * reps)[:pad]
        return remaining

    def __iter__(self) -> Iterator[int]:
        return iter(self._remaining_global()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        """Samples this rank yields in the next iteration (fewer after a mid-epoch resume)."""
        remaining = max(self.length - min(self._start, self.length), 0)
        if self.drop_last:
            return remaining // self.num_replicas
        return -(-remaining // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts from its beginning, the current one keeps its position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0
            self._start = 0

    def advance(self, num_samples: int) -> None:
        """Record that this rank consumed ``num_samples`` more samples (all ranks step together).

        Call it once per optimisation step with the local batch size; the global count grows
        by ``num_samples * num_replicas``.
        """
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.consumed += num_samples * self.num_replicas

    def state_dict(self) -> dict[str, Any]:
        """The position to store in a checkpoint (plain ints and bools)."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "length": self.length,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; the next iteration yields exactly the unconsumed indices.

        Raises:
            ValueError: the dataset length, seed or shuffle flag differ from the saved run, so the
                saved position would point into a different ordering.
        """
        for key in ("length", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; the saved position does not apply"
                )
        if state.get("num_replicas", self.num_replicas) != self.num_replicas:
            logger.info(
                "resuming sampler saved with %d ranks on %d ranks: the %d remaining indices of "
                "epoch %d are re-dealt over the new ranks",
                state["num_replicas"],
                self.num_replicas,
                max(self.length - int(state["consumed"]), 0),
                int(state["epoch"]),
            )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._start = self.consumed


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, bucket)`` keys, one aspect-ratio bucket per batch (so one image shape).

    Indices come from ``sampler`` (this rank's shard, resumable) in order, ``batch_size`` at a time
    (an incomplete last batch is dropped); batch ``j`` of an epoch draws its bucket from
    ``weights`` with a generator seeded by (``seed``, epoch, ``j``): the same on every rank, and a
    resumed run (which starts at batch ``sampler.start // (batch_size * ranks)``) draws the buckets
    the uninterrupted run would have.

    Args:
        sampler: a :class:`ResumableDistributedSampler`.
        batch_size: samples per batch on this rank.
        num_buckets: number of buckets.
        weights: relative frequency of each bucket (default: equal).
        seed: seed of the bucket draws.
    """

    def __init__(self, sampler: ResumableDistributedSampler, batch_size: int, num_buckets: int,
                 weights: Optional[Sequence[float]] = None, seed: int = 0) -> None:
        if batch_size < 1 or num_buckets < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_buckets ({num_buckets}) must be >= 1")
        self.weights = list(weights) if weights is not None else [1.0] * num_buckets
        if len(self.weights) != num_buckets or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"bucket weights {self.weights} must be {num_buckets} non-negative numbers, not all 0")
        self.sampler, self.batch_size, self.num_buckets, self.seed = sampler, batch_size, num_buckets, seed

    def bucket_of(self, epoch: int, batch: int) -> int:
        """The bucket of batch ``batch`` (counted from the start of the epoch) of ``epoch``."""
        rng = random.Random(f"hieratok-bucket/{self.seed}/{epoch}/{batch}")
        return rng.choices(range(self.num_buckets), weights=self.weights)[0]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        j = s.start // (self.batch_size * s.num_replicas)
        batch: list[int] = []
        for i in s:
            batch.append(i)
            if len(batch) == self.batch_size:
                b = self.bucket_of(s.epoch, j)
                yield [(k, b) for k in batch]
                batch, j = [], j + 1

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size
