"""Keep CPU training at the faster of one thread and all cores while the machine's load changes.

When another process holds a core, every all-core OpenMP region waits for a descheduled thread at
its barrier: steps get 10-100x slower, while one thread runs at its usual speed. The governor
watches step times and, when the current thread count has slowed down (or every ``recheck_s``,
backing off while nothing changes), measures the other counts for a few steps and keeps the
fastest. A probe of a count stops at its first step that is clearly slower than the best known
speed, so measuring a stalled configuration costs one step.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

__all__ = ["ThreadGovernor", "thread_candidates"]

log = logging.getLogger(__name__)


def thread_candidates() -> tuple[int, ...]:
    """One thread and all the cores torch may use (the two counts worth comparing on a CPU)."""

    return tuple(sorted({1, max(1, min(os.cpu_count() or 1, torch.get_num_threads()))}))


class ThreadGovernor:
    """Call :meth:`step_done` with each step's seconds; it sets the thread count for the next step.

    Args:
        candidates: thread counts to choose from (e.g. ``(1, os.cpu_count())``).
        speeds: seconds per step already measured for some counts (e.g. by a calibration); the
            counts without one are measured first, smallest first (one thread never stalls).
        probe_steps: steps measured per count (their median is its speed).
        slowdown: the current count is re-examined when its median over the last ``probe_steps``
            exceeds this factor times its measured speed; a probe stops at a step slower than this
            factor times the best speed.
        recheck_s: seconds between routine re-examinations (doubled each time); each costs at most
            one slow step per other count.
    """

    def __init__(self, candidates: Sequence[int], speeds: Optional[dict[int, float]] = None, *,
                 probe_steps: int = 3, slowdown: float = 2.0, recheck_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.candidates = tuple(sorted(set(int(n) for n in candidates)))
        if not self.candidates or min(self.candidates) < 1:
            raise ValueError(f"thread candidates must be positive, got {candidates}")
        self.probe_steps, self.slowdown, self.recheck_s = probe_steps, slowdown, recheck_s
        self.clock, self.set_threads = clock, set_threads
        self.speed = {n: float(s) for n, s in (speeds or {}).items() if n in self.candidates}
        self.switches: list[tuple[int, int]] = []  # (from, to) each time the choice changed
        self._queue = [n for n in self.candidates if n not in self.speed]
        self._times: list[float] = []
        self.current = self._queue[0] if self._queue else min(self.speed, key=self.speed.get)
        self._next_check = clock() + recheck_s
        self._calibrated = not self._queue
        self._old: Optional[float] = None

    def apply(self) -> None:
        """Set the thread count the governor wants now (call before the first step)."""
        self.set_threads(self._queue[0] if self._queue else self.current)

    def new_workload(self) -> None:
        """The step changed (e.g. the next model of an ablation): measure the current count again
        and scale the other counts' speeds by the same ratio."""
        if not self._queue and self.current in self.speed:
            self._old = self.speed.pop(self.current)
            self._queue, self._times = [self.current], []

    @property
    def probing(self) -> bool:
        return bool(self._queue)

    def step_done(self, seconds: float) -> None:
        self._times.append(float(seconds))
        if self._queue:
            self._probe_step()
            return
        self._times = self._times[-self.probe_steps:]
        slow = (len(self._times) == self.probe_steps
                and statistics.median(self._times) > self.slowdown * self.speed[self.current])
        if slow or self.clock() >= self._next_check:
            if not slow:
                self.recheck_s *= 2  # routine check: back off while the machine stays as it is
            self.speed[self.current] = statistics.median(self._times)  # the current count, as it runs now
            self._queue = [n for n in self.candidates if n != self.current]
            self._times = []
            if self._queue:
                self.set_threads(self._queue[0])
            else:
                self._choose()

    def _probe_step(self) -> None:
        n = self._queue[0]
        best = min((s for k, s in self.speed.items() if k != n), default=None)
        stalled = best is not None and self._times[-1] > self.slowdown * best
        if not stalled and len(self._times) < self.probe_steps:
            return
        self.speed[n] = statistics.median(self._times)
        if self._old is not None:  # re-measured after new_workload()
            ratio, self._old = self.speed[n] / self._old, None
            self.speed.update({k: v * ratio for k, v in self.speed.items() if k != n})
        self._queue.pop(0)
        self._times = []
        if self._queue:
            self.set_threads(self._queue[0])
            return
        self._choose()

    def _choose(self) -> None:
        choice = min(self.speed, key=self.speed.get)
        if not self._calibrated:
            log.info("threads: %s s per step by thread count; using %d",
                     {k: round(v, 3) for k, v in sorted(self.speed.items())}, choice)
        elif choice != self.current:
            log.warning("CPU load changed: %s s per step by thread count; using %d threads (was %d)",
                        {k: round(v, 3) for k, v in sorted(self.speed.items())}, choice, self.current)
            self.switches.append((self.current, choice))
        self.current, self._calibrated = choice, True
        self.set_threads(choice)
        self._next_check = self.clock() + self.recheck_s
