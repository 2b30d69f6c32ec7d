"""Shared helpers for the benchmark scripts: timing, the matmul ceiling, peak memory, machine facts.

Timings interleave the variants being compared (round r runs every variant once) so that slow
drift in machine load hits all of them alike; each result keeps every sample, and tables show the
median and the best (minimum) time. Every sample also records how much CPU other processes used
while it ran (``other_cpu``): on a shared 2-core machine one busy neighbour stalls every parallel
region of a 2-thread torch (its second thread waits for a core), so "quiet" samples are reported
apart. Peak memory is the resident-set high-water mark
(``ru_maxrss``) of a fresh subprocess that does one measurement only.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from hieratok.machine import cpu_model

try:  # workers of --compare-src import an older hieratok, which may lack these (only the parent needs them)
    from hieratok.machine import isa_flags, numpy_blas, torch_build_facts
    from hieratok.precision import native_on_cpu
except ImportError:  # pragma: no cover - older checkouts
    isa_flags = numpy_blas = torch_build_facts = native_on_cpu = None  # type: ignore[assignment]

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 tensor-core peak (no sparsity)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> Optional[tuple[int, int]]:
    """(busy clock ticks of the whole machine, of this process); None where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on; utime, stime = 14, 15
        return sum(v) - v[3] - v[4], int(mine[11]) + int(mine[12])
    except (OSError, ValueError, IndexError):
        return None


def others_cpu_share(seconds: float = 2.0) -> Optional[float]:
    """Share of the machine's CPUs used by other processes over the next ``seconds``."""
    b0, t0 = _busy_ticks(), time.perf_counter()
    time.sleep(seconds)
    b1, dt = _busy_ticks(), time.perf_counter() - t0
    if b0 is None or b1 is None:
        return None
    return max(0.0, ((b1[0] - b0[0]) - (b1[1] - b0[1])) / (_CLK_TCK * dt * (os.cpu_count() or 1)))


def wait_for_quiet(max_wait: float, threshold: float = 0.1) -> Optional[float]:
    """Wait (up to ``max_wait`` seconds) until other processes use less than ``threshold`` of the CPUs."""
    deadline = time.monotonic() + max_wait
    share = others_cpu_share()
    while share is not None and share >= threshold and time.monotonic() < deadline:
        print(f"  waiting for a quiet machine: others use {share:.0%} of the CPUs", flush=True)
        time.sleep(5.0)
        share = others_cpu_share()
    return share


@dataclass
class Samples:
    """Seconds per call, and the share of the machine's CPUs other processes kept busy meanwhile
    (``other_cpu``, from /proc/stat; 0.5 on a 2-core machine = one core taken by someone else)."""

    seconds: list[float] = field(default_factory=list)
    other_cpu: list[Optional[float]] = field(default_factory=list)

    def summary(self, quiet: float = 0.1) -> dict[str, Any]:
        q = [s for s, o in zip(self.seconds, self.other_cpu) if o is not None and o < quiet]
        return {"median": statistics.median(self.seconds), "min": min(self.seconds), "n": len(self.seconds),
                "quiet_median": statistics.median(q) if q else None, "n_quiet": len(q),
                "other_cpu_median": statistics.median([o for o in self.other_cpu if o is not None] or [float("nan")])}


def time_once(fn: Callable[[], Any], device: torch.device | str = "cpu", samples: Optional[Samples] = None) -> float:
    sync(device)
    b0 = _busy_ticks()
    t = time.perf_counter()
    fn()
    sync(device)
    dt = time.perf_counter() - t
    b1 = _busy_ticks()
    if samples is not None:
        other = None
        if b0 is not None and b1 is not None:
            ticks = (b1[0] - b0[0]) - (b1[1] - b0[1])
            other = max(0.0, ticks / (_CLK_TCK * dt * (os.cpu_count() or 1)))
        samples.seconds.append(dt)
        samples.other_cpu.append(other)
    return dt


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                device: torch.device | str = "cpu", log: bool = False) -> dict[str, Samples]:
    """Time every function ``rounds`` times, interleaved round by round, after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: Samples() for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            time_once(fn, device, out[k])
        if log:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v.seconds[-1]:.3f}s" + ("" if v.other_cpu[-1] is None else f" (others {v.other_cpu[-1]:.0%})")
                for k, v in out.items()), flush=True)
    return out


def matmul_gflops(n: int = 3072, reps: int = 5, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> list[float]:
    """GFLOP/s of ``reps`` (n x n) @ (n x n) products (2 n^3 FLOPs each), after one warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        a @ b
        return [2 * n ** 3 / time_once(lambda: a @ b, device) / 1e9 for _ in range(reps)]


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def rss_now_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """High-water resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 2 ** 10


def worker_env(src: Optional[str]) -> Optional[dict[str, str]]:
    """The environment of a worker process that imports hieratok from ``src`` (None: this one's)."""
    if src is None:
        return None
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}


def run_worker(script: str, args: Sequence[str], timeout: float = 3600, src: Optional[str] = None) -> dict[str, Any]:
    """Run ``python script args`` in a fresh process; its last stdout line is a JSON result.
    ``src``: import hieratok from this source folder (e.g. a worktree of an older commit) instead."""
    cmd = [sys.executable, script, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(src))
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["exit code %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what a benchmark ran (goes into every JSON result)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa": isa_flags(),  # of hieratok.machine.ISA_FLAGS, those this CPU has
        "bf16_native": native_on_cpu("bf16"),  # False: no bf16 instructions, CPU bf16 is emulated (slow)
        "torch_build": torch_build_facts(),  # BLAS / LAPACK provider, MKL and oneDNN versions
        "numpy_blas": numpy_blas(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "packages": {p: _version(p) for p in ("hieratok", "numpy", "diffusers")},
        "git_commit": _git_commit(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def write_json(path: Optional[str], result: dict[str, Any]) -> None:
    if not path:
        return
    if hasattr(os, "getloadavg"):
        result.setdefault("machine", {})["loadavg_at_end"] = os.getloadavg()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def print_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print rows as a fixed-width table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, line in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
