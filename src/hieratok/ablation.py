"""``hieratok ablate``: variants of a tokenizer preset, each trained with several seeds for the same
steps, evaluated on held-out images, and compared with mean +- std and paired differences.

The demo (:mod:`hieratok.demo`) is this with the variants ``single`` and ``multi``. A variant is a
name from :data:`VARIANTS` (the paper's Tables 2-4 and the downsampler designs) or a custom
``name:key=value,key=value`` of training-config overrides. Seed ``k`` gives every variant the same
data order and (through the shared construction order) the same encoder initialisation, so
differences are paired by seed: a direction is claimed only when a paired t-test over the seeds
says so (p < 0.05), and every table shows the seed spread.

Runs are written to ``<out>/runs/<variant>/seed<k>/`` (training logs, ``result.json``) in seed
order (every variant of seed 0 first), so a budget that runs out still leaves complete rounds;
``--resume`` keeps finished runs of the same plan.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from ._optional import require
from .config import settings_diff
from .data import EmbeddedPhotos, build_dataset, collate_drop_none, pil_to_tensor, tensor_to_pil
from .evaluate import ReconEvalConfig, evaluate_latents, evaluate_reconstruction
from .evaluate.latents import encode_latents_and_mirrored
from .hub import write_atomic
from .machine import cpu_model
from .metrics import InceptionFeatures, psnr
from .metrics.image import quantize_to_uint8
from .report import Report, plot_loss_curves, plot_per_scale_metric, plot_tsne, pyramid_strip, reconstruction_grid
from .report.plots import read_csv_log
from .report.table import SimpleTable
from .tokenizers import HieraTok
from .train import Trainer, load_config
from .train.parallel import unwrap
from .train.threads import ThreadGovernor, thread_candidates
from .workflows.reconstruct import reconstruct_image


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=float) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))

__all__ = ["AblationConfig", "Variant", "VARIANTS", "parse_variant", "run_ablation", "paired_comparison",
           "choose_threads", "load_notes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """A named training setup: a tokenizer preset and training-config overrides (dotted keys)."""

    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _fewer_scales(preset: str) -> dict[str, Any]:
    scales = list(HieraTok.preset_config(preset).scales)
    if len(scales) < 3:
        raise ValueError(f"preset {preset!r} has scales {scales}: too few to drop one")
    return {"model.scales": scales[:-2] + scales[-1:]}  # drop the second-finest, e.g. [1, 2, 4, 16]


# name -> (what it is, overrides of the multi-scale preset); "single" uses the "-single" twin
VARIANTS: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "single": ("the single-scale twin (baseline of Table 2)", lambda p: {}),
    "multi": ("the multi-scale preset as configured", lambda p: {}),
    "conv": ("paper-literal conv stacks (Table 3)", lambda p: {"model.downsample": "conv"}),
    "conv-residual": ("conv stacks as a residual over area interpolation", lambda p: {"model.downsample": "conv-residual"}),
    "conv-prenorm": ("conv stacks with the norm in a residual branch", lambda p: {"model.downsample": "conv-prenorm"}),
    "interp": ("area interpolation, no parameters (Table 3)", lambda p: {"model.downsample": "interp"}),
    "full": ("full attention across scales (Table 4)", lambda p: {"model.attention": "full"}),
    "independent": ("scale-independent attention (Table 4)", lambda p: {"model.attention": "scale_independent"}),
    "fewer-scales": ("without the second-finest scale", _fewer_scales),
    "pixels": ("per-scale loss weights by pixel count", lambda p: {"loss.scale_weights": "pixels"}),
}


def parse_variant(spec: str, preset: str) -> Variant:
    """``"interp"`` (a name of :data:`VARIANTS`) or ``"mine:model.downsample=interp,loss.kl=1e-5"``."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"variant {spec!r}: the name must be a plain word")
    if not sep:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)} or write name:key=value,...")
        over = VARIANTS[name][1](preset)
        return Variant(name, f"{preset}-single" if name == "single" else preset, over)
    over: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise ValueError(f"variant {spec!r}: {item!r} is not key=value")
        over[k.strip()] = yaml.safe_load(v)
    return Variant(name, over.pop("preset", preset), over)


@dataclass
class AblationConfig:
    """What to compare and on what budget (defaults: the demo's miniature training settings)."""

    preset: str = "tiny"
    variants: tuple[str, ...] = ("single", "multi")
    baseline: str = "single"
    seeds: int = 3
    minutes: float = 10.0  # whole budget; training gets what calibration, evaluation and the report leave
    steps: Optional[int] = None  # fixed steps per run instead of the budget
    data: Optional[str] = None  # training images; None = the embedded photos
    eval_data: Optional[str] = None  # held-out images; None = the embedded held-out photos
    out: str = "runs/ablate"
    batch_size: int = 16
    lr: float = 4e-4
    eval_crops_per_photo: int = 64  # embedded held-out photos: crops per photo (3 photos)
    kid: bool = True  # rKID on the held-out images (unbiased at this count; rFID is not)
    uniformity: bool = True  # latent uniformity (VA-VAE protocol) of every run
    tsne_runs: int = 1  # per run: the spread over runs comes from the seeds
    threads: Optional[int] = None  # torch threads (of each run process); None: see workers
    workers: Optional[int] = None  # runs trained at once, each in a process; None: one per core (<= 4)
    calibrate_s: float = 12.0  # with several workers: seconds each variant's step is timed, side by side
    report_reserve_s: float = 20.0  # time kept for the report (measured: about 5 s for two variants)
    # share of the training time kept free: a shared machine's speed drifts (two demo runs minutes
    # apart on a 2-core VM trained 15% slower and up to 30% faster than their calibration)
    slack: float = 0.1
    # the first runs time their steps as calibration did; slower or faster than calibrated by more than
    # this factor (a neighbour that held a core during calibration and left, or one that came), every
    # run is planned again from the measured speed, once; None: never (steps stay as calibrated)
    replan_factor: Optional[float] = 1.25
    resume: bool = False  # keep finished runs of the same plan
    overwrite: bool = False  # replace a non-empty output folder
    progress: bool = True

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        if len(set(self.variants)) != len(self.variants) or not self.variants:
            raise ValueError(f"variants must be distinct and at least one, got {list(self.variants)}")
        names = [v.partition(":")[0] for v in self.variants]
        if self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not among the variants {names}")
        if self.seeds < 1 or (self.steps is not None and self.steps < 1) or not self.minutes > 0:
            raise ValueError(f"need seeds >= 1, steps >= 1 and minutes > 0 (got {self.seeds}, {self.steps}, {self.minutes})")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if not 0 <= self.slack < 1:
            raise ValueError(f"slack must be in [0, 1), got {self.slack}")
        if self.replan_factor is not None and not self.replan_factor > 1:
            raise ValueError(f"replan_factor must be > 1 or None, got {self.replan_factor}")
        if (self.workers is not None and self.workers < 1) or (self.threads is not None and self.threads < 1):
            raise ValueError(f"workers and threads must be >= 1 (got {self.workers}, {self.threads})")


# ---- training --------------------------------------------------------------------------------------

def _short_side(data: Optional[str], size: int) -> Optional[int]:
    """Resize before cropping: the embedded photos at twice the crop size (crops then see more of
    each scene), other data as it is."""
    return 2 * size if data is None else None


def _heldout(c: AblationConfig, size: int) -> Any:
    """The held-out images every run is evaluated on (crops of the embedded held-out photos, or
    ``eval_data``), unreadable ones as None."""
    return build_dataset(c.eval_data, "eval", size, crops_per_photo=c.eval_crops_per_photo,
                         short_side=_short_side(c.eval_data, size), on_error="none")


def _train_config(c: AblationConfig, v: Variant, seed: int, steps: int, out: Path) -> Any:
    over: dict[str, Any] = {"data.path": c.data, "seed": seed, "batch_size": c.batch_size, "optim.lr": c.lr,
                            "optim.end_lr": c.lr / 10, "log_every": 5, "image_every": 0, "ckpt_every": 0,
                            "keep_last": 1, "ema_decay": 0.99, "progress": c.progress, "tensorboard": False,
                            "adapt_threads": False,  # one governor for all runs (run_ablation)
                            "data.short_side": _short_side(c.data, HieraTok.preset_config(c.preset).image_size),
                            "steps": steps, "preset": v.preset, "out_dir": str(out)}
    return load_config(overrides={**over, **v.overrides})


def choose_threads(step: Callable[[], None], candidates: tuple[int, ...], repeats: int = 3) -> tuple[int, dict[int, float]]:
    """The thread count among ``candidates`` whose ``step`` runs fastest (median of ``repeats``),
    measured smallest first by a :class:`~hieratok.train.threads.ThreadGovernor`: a count that
    stalls (another process holds a core) is given up after one slow step.
    """
    before = torch.get_num_threads()
    g = ThreadGovernor(candidates, probe_steps=repeats)
    g.apply()
    while g.probing:
        t0 = time.perf_counter()
        step()
        g.step_done(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return g.current, dict(g.speed)


def _calibrate(c: AblationConfig, variants: list[Variant], tmp: Path) -> tuple[dict[str, float], int, dict[int, float]]:
    """Seconds per training step of every variant, and the thread count to use."""

    per_step: dict[str, float] = {}
    threads, timings = c.threads, {}
    for i, v in enumerate(variants):
        t = Trainer(_train_config(c, v, 0, 10**6, tmp / v.name))
        t.fit(max_steps=2)  # allocation and lazy initialisation
        if i == 0 and threads is None:
            threads, timings = choose_threads(lambda: t.fit(max_steps=1), thread_candidates())
            log.info("threads: %s s per step -> using %d", {k: round(s, 3) for k, s in timings.items()}, threads)
        torch.set_num_threads(threads)
        per_step[v.name] = _step_seconds(t, 0.0, 4)
    return per_step, threads, timings


class _StepTimes:
    """Stands in for the trainer's thread governor to read its step times (data, forward, backward,
    optimizer; not the bookkeeping of a ``fit`` call, which a run pays once)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def apply(self) -> None:
        pass

    def new_workload(self) -> None:
        pass

    def step_done(self, seconds: float) -> None:
        self.seconds.append(seconds)

    @property
    def current(self) -> int:
        return torch.get_num_threads()


class PlanChanged(Exception):
    """A first run measured a step time off the calibration by more than the plan allows: ``ratios``
    maps variants to measured / calibrated seconds per step (None where a run was stopped by
    another one before it had timed 5 steps)."""

    def __init__(self, ratios: dict[str, Optional[float]]) -> None:
        super().__init__(ratios)
        self.ratios = ratios


class _PlanCheck:
    """Wraps the thread governor (or None) of a run of variant ``name`` in the trainer: after three
    warm-up steps it times the steps as calibration did (their median over at least ``seconds`` and 5
    steps) and compares that once with ``planned_s``; off by more than ``factor`` either way it raises
    :class:`PlanChanged`, after setting ``stop`` (a shared flag) so that the runs beside it raise too
    at their next step."""

    def __init__(self, inner: Any, name: str, planned_s: float, seconds: float, factor: float, stop: Any) -> None:
        self.inner, self.name, self.planned_s, self.stop = inner, name, planned_s, stop
        self.seconds, self.factor = seconds, factor
        self.times: list[float] = []
        self.warm, self.checked = 0, False

    @property
    def current(self) -> int:
        return torch.get_num_threads() if self.inner is None else self.inner.current

    def apply(self) -> None:
        if self.inner is not None:
            self.inner.apply()

    def new_workload(self) -> None:
        if self.inner is not None:
            self.inner.new_workload()

    def ratio(self) -> Optional[float]:
        return float(np.median(self.times)) / self.planned_s if len(self.times) >= 5 else None

    def step_done(self, seconds: float) -> None:
        if self.inner is not None:
            self.inner.step_done(seconds)
        if self.stop.value:
            raise PlanChanged({self.name: self.ratio()})
        if self.checked:
            return
        if self.warm < 3:
            self.warm += 1
            return
        self.times.append(seconds)
        if len(self.times) >= 5 and sum(self.times) >= self.seconds:
            self.checked = True
            r = self.ratio()
            if not 1 / self.factor <= r <= self.factor:
                self.stop.value = 1
                raise PlanChanged({self.name: r})


def _step_seconds(t: Any, seconds: float, min_steps: int) -> float:
    """The median step time of trainer ``t`` over at least ``min_steps`` steps and ``seconds``
    (median: robust to a slow start and to a neighbour's start-up)."""
    timer, t0 = _StepTimes(), time.perf_counter()
    t.threads = timer
    while len(timer.seconds) < min_steps or time.perf_counter() - t0 < seconds:
        t.fit(max_steps=5)  # a run logs every 5 steps
    return float(np.median(timer.seconds))


# ---- evaluation ------------------------------------------------------------------------------------

class _CachedInception(torch.nn.Module):
    """The Inception extractor with the features of images seen before reused, image by image
    (every run of an ablation scores the same held-out originals; :func:`_warm_heldout` computes
    them while the runs are planned)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.source, self.cache = inner, inner.source, {}

    def forward(self, x_u8: torch.Tensor) -> torch.Tensor:
        keys = [hashlib.sha1(im.numpy().tobytes()).hexdigest() + str(tuple(im.shape)) for im in x_u8.cpu()]
        new = [i for i, k in enumerate(keys) if k not in self.cache]
        if new:  # all of a batch seen for the first time: the batch as it came, in one pass
            self.cache.update(zip((keys[i] for i in new), self.inner(x_u8[new])))
        return torch.stack([self.cache[k] for k in keys])


def _warm_heldout(c: AblationConfig) -> Optional[tuple[float, int]]:
    """Run the held-out originals through this process's Inception extractor (batches of 16, as
    the evaluation reads them), so that every evaluation in this process reuses their features;
    returns (seconds it took, images), None without rKID."""
    inception = _inception(c)
    if inception is None:
        return None
    n, t0 = 0, time.perf_counter()
    for batch in DataLoader(_heldout(c, HieraTok.preset_config(c.preset).image_size), batch_size=16,
                            collate_fn=collate_drop_none):
        if batch is not None:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            inception(quantize_to_uint8(x))
            n += x.shape[0]
    return time.perf_counter() - t0, n


def _model_from(trainer: Any) -> torch.nn.Module:
    model = copy.deepcopy(unwrap(trainer.raw["model"])).eval()
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    return model


def _evaluate(c: AblationConfig, model: torch.nn.Module, inception: Optional[torch.nn.Module], seed: int,
              train_stats: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict[str, Any]:
    size = model.config.image_size
    short = _short_side(c.eval_data, size)
    try:  # all of them (shards do not know their length: as many as they hold)
        num = len(_heldout(c, size))
    except TypeError:
        num = 10**6
    ecfg = ReconEvalConfig(data=c.eval_data, num=num, batch_size=16, keep_images=6, progress=False, fid=False,
                           kid=c.kid and inception is not None, crops_per_photo=c.eval_crops_per_photo, short_side=short)
    res = evaluate_reconstruction(model, ecfg, "cpu", inception=inception)
    if c.uniformity:
        lat, lat_flip = encode_latents_and_mirrored(model, c.eval_data, num, 32, "cpu",
                                                    crops_per_photo=c.eval_crops_per_photo, short_side=short)
        res["uniformity"] = evaluate_latents(model, None, latents=lat, latents_flip=lat_flip, num_points=len(lat),
                                             num_runs=c.tsne_runs, seed=seed, train_stats=train_stats)
        res.update({k: res["uniformity"][k] for k in ("density_cv", "gini", "normalized_entropy")})
    return res


def _full_photo(c: AblationConfig, model: torch.nn.Module) -> Optional[dict[str, Any]]:
    """The first embedded held-out photo, whole and at its own aspect ratio (at the scale the runs
    trained on: short side twice the crop size), reconstructed in blended tiles of the training size,
    with its PSNR (8-bit); None for other evaluation data."""
    if c.eval_data is not None:
        return None

    size = model.config.image_size
    photos = EmbeddedPhotos("heldout", size, short_side=_short_side(None, size))
    x = pil_to_tensor(photos.photo(0))
    rec = reconstruct_image(model, x, "tile")[-1]
    p = psnr(quantize_to_uint8(rec[None]), quantize_to_uint8(x[None]), floor_mse=True)
    return {"input": x, "recon": rec, "psnr": torch.as_tensor(p, dtype=torch.float64).reshape(()), "name": photos.names[0]}


def _train_stats(c: AblationConfig, model: torch.nn.Module, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean / std of the model's latents on training crops (VA-VAE normalises with the
    training set's statistics)."""

    ds = build_dataset(c.data, "train", model.config.image_size, seed=seed,
                       short_side=_short_side(c.data, model.config.image_size))
    xs = torch.stack([ds[i][0] for i in range(256)])
    with torch.no_grad():
        z = torch.cat([model.encode(xs[i:i + 32]).mode() for i in range(0, len(xs), 32)])
    z = z.double()
    return z.mean((0, 2, 3)).numpy(), z.std((0, 2, 3), unbiased=False).numpy()


# ---- statistics ------------------------------------------------------------------------------------

def paired_comparison(base: list[float], other: list[float], higher_is_better: bool) -> dict[str, Any]:
    """Differences ``other - base`` paired by seed: mean, sample std, two-sided paired t-test p, and a
    verdict: "better"/"worse" at p < 0.05, else "within seed spread" (one seed: "one seed")."""
    d = np.asarray(other, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    n = len(d)
    out: dict[str, Any] = {"n": n, "mean": float(d.mean()), "std": float(d.std(ddof=1)) if n > 1 else float("nan"),
                           "p": float("nan"), "all_seeds_agree": bool(n > 0 and (np.all(d > 0) or np.all(d < 0)))}
    if n < 2:
        out["verdict"] = "one seed"
        return out
    if out["std"] == 0.0:
        p = 0.0 if out["mean"] != 0 else 1.0
    else:
        stats = require("scipy.stats", "the paired t-test of an ablation")
        p = float(stats.t.sf(abs(out["mean"]) / (out["std"] / math.sqrt(n)), n - 1) * 2)
    out["p"] = p
    good = (out["mean"] > 0) == higher_is_better
    out["verdict"] = ("better" if good else "worse") if p < 0.05 else "within seed spread"
    return out


# name, label, higher is better, format, scale for display
METRICS: list[tuple[str, str, bool, str, float]] = [
    ("psnr", "PSNR (dB)", True, ".2f", 1.0),
    ("ssim", "SSIM", True, ".3f", 1.0),
    ("perceptual", "perceptual", False, ".3f", 1.0),
    ("rkid", "rKID x1e3", False, ".1f", 1e3),
    ("color_error", "colour error", False, ".3f", 1.0),
    ("density_cv", "density CV", False, ".3f", 1.0),
    ("gini", "Gini", False, ".3f", 1.0),
    ("normalized_entropy", "norm. entropy", True, ".4f", 1.0),
]


def _value(res: dict[str, Any], key: str) -> Optional[float]:
    if key == "perceptual":
        key = res.get("perceptual_name", "none")
    v = res.get(key)
    return None if v is None or not np.isfinite(v) else float(v)


def summarize(results: dict[str, dict[int, dict[str, Any]]], baseline: str) -> dict[str, Any]:
    """Mean / std per variant and metric, and paired comparisons with ``baseline`` over the seeds
    both have."""
    summary: dict[str, Any] = {"variants": {}, "vs_baseline": {}}
    for name, runs in results.items():
        row = {}
        for key, *_ in METRICS:
            vals = [_value(r, key) for r in runs.values()]
            vals = [v for v in vals if v is not None]
            if vals:
                row[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"),
                            "n": len(vals), "values": vals}
        per_scale = [r.get("psnr_per_scale", {}) for r in runs.values()]
        if per_scale and per_scale[0]:
            row["psnr_per_scale"] = {str(s): float(np.mean([p[s] for p in per_scale])) for s in per_scale[0]}
        summary["variants"][name] = row
    for name, runs in results.items():
        if name == baseline:
            continue
        seeds = sorted(set(runs) & set(results[baseline]))
        cmp = {}
        for key, _, higher, *_ in METRICS:
            a = [_value(results[baseline][s], key) for s in seeds]
            b = [_value(runs[s], key) for s in seeds]
            pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
            if pairs:
                cmp[key] = paired_comparison([x for x, _ in pairs], [y for _, y in pairs], higher)
        summary["vs_baseline"][name] = cmp
    return summary


def _fmt(m: Optional[dict[str, Any]], fmt: str, scale: float) -> str:
    if not m:
        return "-"
    s = format(m["mean"] * scale, fmt)
    return s if not np.isfinite(m["std"]) else f"{s} ± {format(m['std'] * scale, fmt)}"


def summary_tables(summary: dict[str, Any], baseline: str) -> tuple[Any, Any]:
    """(mean ± std per variant, paired differences with the baseline) as report tables."""

    keys = [m for m in METRICS if any(m[0] in row for row in summary["variants"].values())]
    n = max((row[k]["n"] for row in summary["variants"].values() for k in row if k != "psnr_per_scale"), default=0)
    t1 = SimpleTable(["variant"] + [m[1] for m in keys],
                     [[name] + [_fmt(row.get(k), f, s) for k, _, _, f, s in keys] for name, row in summary["variants"].items()],
                     ["left"] + ["right"] * len(keys), caption=f"mean ± std over seeds (up to {n})")
    rows = []
    for name, cmp in summary["vs_baseline"].items():
        cells = [name]
        for k, _, _, f, s in keys:
            c = cmp.get(k)
            if not c:
                cells.append("-")
                continue
            d = format(c["mean"] * s, "+" + f)
            spread = "" if not np.isfinite(c["std"]) else f" ± {format(c['std'] * s, f)}"
            p = "" if not np.isfinite(c["p"]) else f" p={c['p']:.2g}"
            mark = {"better": " better", "worse": " worse"}.get(c["verdict"], "")
            cells.append(f"{d}{spread}{mark}{p}")
        rows.append(cells)
    t2 = SimpleTable(["variant"] + [m[1] for m in keys], rows, ["left"] + ["right"] * len(keys),
                     caption=f"difference to {baseline}, paired by seed: mean ± std, paired t-test p; "
                             "'better' / 'worse' only where p < 0.05")
    return t1, t2


def conclusions(summary: dict[str, Any], baseline: str) -> list[str]:
    """One sentence per variant saying what the numbers support, and no more."""
    lines = []
    labels = {k: lab for k, lab, *_ in METRICS}
    for name, cmp in summary["vs_baseline"].items():
        if not cmp:
            continue
        n = max(c["n"] for c in cmp.values())
        if n < 2:
            lines.append(f"{name} vs {baseline}: one seed only, no direction can be claimed.")
            continue
        better = [labels[k] for k, c in cmp.items() if c["verdict"] == "better"]
        worse = [labels[k] for k, c in cmp.items() if c["verdict"] == "worse"]
        same = [labels[k] for k, c in cmp.items() if c["verdict"] == "within seed spread"]
        parts = []
        if better:
            parts.append("better on " + ", ".join(better))
        if worse:
            parts.append("worse on " + ", ".join(worse))
        if same:
            parts.append("not distinguishable from the seed spread on " + ", ".join(same))
        lines.append(f"{name} vs {baseline} ({n} seeds, paired t-test p < 0.05): " + "; ".join(parts) + ".")
    return lines


# ---- the run ---------------------------------------------------------------------------------------

def _plan(c: AblationConfig) -> dict[str, Any]:
    keep = ("preset", "variants", "baseline", "seeds", "data", "eval_data", "batch_size", "lr", "eval_crops_per_photo",
            "kid", "uniformity", "tsne_runs")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(c).items() if k in keep}


def _prepare_out(c: AblationConfig) -> tuple[Path, Optional[dict[str, Any]]]:
    """The output folder, refusing to overwrite one that is not empty without ``overwrite`` or ``resume``."""
    out = Path(c.out)
    plan_path = out / "ablation.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file")
    if out.exists() and any(out.iterdir()):
        if c.overwrite:
            shutil.rmtree(out)
        elif c.resume:
            if not plan_path.is_file():
                raise ValueError(f"{out} holds no ablation to resume (no ablation.json)")
            old = json.loads(plan_path.read_text())
            diff = settings_diff(old["plan"], _plan(c))
            if diff:
                raise ValueError(f"{out} holds an ablation with other settings ({'; '.join(diff)}); use another --out")
            return out, old
        else:
            raise ValueError(f"{out} is not empty: pass --resume to continue it, --overwrite to replace it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def _plan_workers(c: AblationConfig) -> tuple[int, int]:
    """(runs trained at once, torch threads per run).

    Small tokenizers use two cores poorly (measured for the demo's step: 1.36x from the second
    thread), while two one-thread processes run side by side at nearly full speed each. So on a
    machine with several cores the runs are spread over processes, one per core up to the runs
    there are (at most 4), each with ``cores // workers`` threads to start with; unless ``threads``
    is given, a run takes the cores of runs that have ended when that measures faster (:class:`_CoreShare`). One worker trains
    the runs one after the other in this process, at the faster of 1 and all cores (``threads=None``).
    """
    cores, runs = os.cpu_count() or 1, c.seeds * len(c.variants)
    workers = c.workers if c.workers is not None else max(1, min(runs, 4, cores // (c.threads or 1)))
    if workers == 1:
        return 1, c.threads or torch.get_num_threads()
    return workers, c.threads or max(1, cores // workers)


def _makespan(durations: list[float], workers: int, alone: Optional[list[float]] = None) -> float:
    """Seconds until the last job ends when ``workers`` take jobs in this order as they come free;
    ``alone``: per job, how many times faster it runs once every other job has ended (a run left
    alone takes the idle cores, :class:`_CoreShare`)."""
    free, ends = [0.0] * workers, []
    for d in durations:
        i = free.index(min(free))
        free[i] += d
        ends.append(free[i])
    if alone is None or workers < 2 or len(ends) < 2:
        return max(free)
    last = max(range(len(ends)), key=ends.__getitem__)
    others = max(e for j, e in enumerate(ends) if j != last)
    return others + (ends[last] - others) / alone[last]


def _job_order(c: AblationConfig, variants: list["Variant"], per_step: dict[str, float], workers: int) -> list[tuple["Variant", int]]:
    """One worker: seed by seed (every variant of a seed before the next seed, so that a budget that
    runs out leaves complete pairs). Several: seed 0 of every variant first (the first runs check the
    plan of their variant, :class:`_PlanCheck`), then the slowest variant's runs first (longest job
    first balances the workers), seed by seed within a variant."""
    jobs = [(v, seed) for seed in range(c.seeds) for v in variants]
    if workers > 1:
        jobs.sort(key=lambda j: (j[1] > 0, -per_step.get(j[0].name, 0.0), j[1]))
    return jobs


def _steps_that_fit(left_s: float, jobs: list[tuple["Variant", int]], per_step: dict[str, float], eval_s: float,
                    workers: int, alone: Optional[dict[str, float]] = None) -> int:
    """The most steps per run for which every job (training + evaluation) ends within ``left_s``;
    ``alone``: by variant, how many times faster a run left alone is (:func:`_makespan`)."""
    speed = None if not alone else [alone.get(v.name, 1.0) for v, _ in jobs]

    def span(steps: int) -> float:
        return _makespan([steps * per_step[v.name] + eval_s for v, _ in jobs], workers, speed)
    lo, hi = 1, 1
    while span(hi * 2) <= left_s and hi < 10**7:
        hi *= 2
    hi *= 2
    while hi - lo > 1:  # span is increasing in steps: the largest fitting count
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if span(mid) <= left_s else (lo, mid)
    return lo


def _run_dir(out: Path, v: "Variant", seed: int) -> Path:
    return out / "runs" / v.name / f"seed{seed}"


def _run_one(c: AblationConfig, v: "Variant", seed: int, steps: int, out: Path, planned_s: Optional[float],
             governor: Optional["ThreadGovernor | _CoreShare"] = None,
             check: Optional[tuple[float, Any]] = None) -> None:
    """Train and evaluate one run (in this process); writes its ``result.json`` (and, for seed 0, the
    samples, the whole photo and the t-SNE points the report shows). ``check``: (calibrated seconds
    per step, shared stop flag) for a first run that checks the plan (:class:`_PlanCheck`)."""
    run_dir = _run_dir(out, v, seed)
    if run_dir.exists():  # an interrupted run: train it again from the start
        shutil.rmtree(run_dir)
    log.info("training %s (%s), seed %d, %d steps", v.name, v.preset, seed, steps)
    t0 = time.perf_counter()
    t = Trainer(_train_config(c, v, seed, steps, run_dir))
    if check is not None and c.replan_factor is not None:
        governor = _PlanCheck(governor, v.name, check[0], c.calibrate_s, c.replan_factor, check[1])
    if governor is not None:
        governor.new_workload()
        t.threads = governor
    t.fit()
    train_s = time.perf_counter() - t0
    if governor is not None:
        torch.set_num_threads(governor.current)  # evaluate at the count training found fastest
    model = _model_from(t)
    stats = _train_stats(c, model, seed) if c.uniformity else None
    res = _evaluate(c, model, _inception(c), seed, stats)
    res["train_seconds"] = train_s
    if planned_s:
        res["train_seconds_planned"] = planned_s
    samples = res.pop("samples")
    if seed == 0:  # tensors only, read back with weights_only=True
        torch.save({"inputs": samples["inputs"], "pyramids": samples["pyramids"]}, run_dir / "samples.pt")
        full = _full_photo(c, model)
        if full is not None:
            torch.save(full, run_dir / "full_photo.pt")
    lean = {k: v2 for k, v2 in res.items() if k != "uniformity"}
    if "uniformity" in res:
        lean["uniformity"] = {k: v2 for k, v2 in res["uniformity"].items() if k not in ("points_2d", "densities")}
        if seed == 0:
            np.savez(run_dir / "tsne.npz", points_2d=res["uniformity"]["points_2d"],
                     densities=res["uniformity"]["densities"])
    _write_json(run_dir / "result.json", lean)


_PROCESS_INCEPTION: dict[str, torch.nn.Module] = {}  # one cached extractor per process (worker or main)
_BUSY: dict[str, Any] = {}  # in a run process: the shared count of runs under way ("runs"), the cores, the stop flag


class _CoreShare:
    """Torch threads of a run process: up to its share of the cores (the cores divided among the
    runs under way, re-read every step), so a run left alone at the end of the schedule may take
    all the cores. A share above one thread is only taken if it measures faster: a
    :class:`~hieratok.train.threads.ThreadGovernor` over (1, share) probes it and drops it after one
    stalled step (another process holding a core). Used in place of a governor by the trainer
    (``apply`` / ``step_done``) when the thread count is not given."""

    def __init__(self, runs: Any, cores: int, set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.runs, self.cores, self.set_threads = runs, cores, set_threads
        self.share, self.governor, self.current = 1, None, 0  # 0: not set yet
        self.one_thread_s: list[float] = []  # the last step times at one thread

    def _threads(self, n: int) -> None:
        if n != self.current:
            self.current = n
            self.set_threads(n)

    def apply(self) -> None:
        share = max(1, self.cores // max(1, self.runs.value))
        if share != self.share:
            self.share = share
            self.governor = None
            if share > 1:  # probe the larger count against one thread's recent speed
                known = {1: float(np.median(self.one_thread_s))} if self.one_thread_s else None
                self.governor = ThreadGovernor((1, share), speeds=known, set_threads=self._threads)
        if self.governor is None:
            self._threads(1)
        else:
            self.governor.apply()

    def step_done(self, seconds: float) -> None:
        if self.current == 1:
            self.one_thread_s = (self.one_thread_s + [seconds])[-3:]
        if self.governor is not None:
            self.governor.step_done(seconds)  # it logs a change of thread count itself
        self.apply()

    def new_workload(self) -> None:
        self.one_thread_s, self.share, self.governor = [], 1, None  # another model: measure again
        self.apply()


def _inception(c: AblationConfig) -> Optional[torch.nn.Module]:
    if not c.kid:
        return None
    if "net" not in _PROCESS_INCEPTION:
        _PROCESS_INCEPTION["net"] = _CachedInception(InceptionFeatures())
    return _PROCESS_INCEPTION["net"]


def _worker_init(threads: int, level: int, runs: Any = None, stop: Any = None) -> None:
    """A run process: its thread count, the shared stop flag of :class:`_PlanCheck`, and its warnings
    in the parent's format (spawned processes start without the parent's logging setup; the parent's
    progress bar stands for their INFO records unless the parent logs DEBUG)."""
    torch.set_num_threads(threads)
    _BUSY["stop"] = stop
    logging.basicConfig(level=level if level <= logging.DEBUG else max(level, logging.WARNING),
                        format="%(asctime)s %(levelname)s [run process] %(message)s")
    if runs is not None:  # threads not given: share the cores among the runs under way
        _BUSY.update(runs=runs, cores=os.cpu_count() or 1)


def _run_in_process(c: AblationConfig, v: "Variant", seed: int, steps: int, out: Path, planned_s: Optional[float],
                    check_s: Optional[float] = None) -> None:
    """:func:`_run_one` in a run process, counted among the runs under way while it lasts;
    ``check_s``: the calibrated seconds per step, for a first run that checks the plan."""
    runs = _BUSY.get("runs")
    check = None if check_s is None else (check_s, _BUSY["stop"])
    if runs is None:
        return _run_one(c, v, seed, steps, out, planned_s, check=check)
    with runs.get_lock():
        runs.value += 1
    try:
        _run_one(c, v, seed, steps, out, planned_s, _CoreShare(runs, _BUSY["cores"]), check)
    finally:
        with runs.get_lock():
            runs.value -= 1


def _calibrate_one(c: AblationConfig, v: "Variant", tmp: str, seconds: float = 12.0,
                   threads: Optional[int] = None) -> tuple[float, Optional[tuple[float, int]]]:
    """Seconds per training step of one variant in this process, then the Inception pass over the
    held-out originals (:func:`_warm_heldout`, which leaves their features in this worker for its
    runs). Steps: after three warm-up steps, steps for ``seconds`` (at least 5), so that variants
    calibrated side by side overlap all the time (a fixed step count would leave the slower one
    timing its last steps alone, i.e. too fast). ``threads``: time at this many threads instead,
    without the Inception pass (a run left alone, :func:`_alone_speedup`)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        t = Trainer(_train_config(replace(c, progress=False), v, 0, 10**6, Path(tmp) / v.name))
        t.fit(max_steps=3)  # allocation and lazy initialisation
        per_step = _step_seconds(t, seconds, 5)
    finally:
        torch.set_num_threads(before)
    del t
    return per_step, None if threads is not None else _warm_heldout(c)


def _alone_speedup(c: AblationConfig, variants: list["Variant"], per_step: dict[str, float], pool: ProcessPoolExecutor,
                   tmp: str) -> dict[str, float]:
    """How many times faster than side by side the fastest variant trains on all cores, alone (the
    runs that end a schedule are its runs, :func:`_job_order`; a run left alone takes the idle cores
    when that measures faster, :class:`_CoreShare`, so never below 1). Timed in one worker while
    the others wait; 3 s of steps."""
    v = min(variants, key=lambda w: per_step[w.name])
    alone_s = pool.submit(_calibrate_one, c, v, str(Path(tmp) / "alone"), 3.0, os.cpu_count() or 1).result()[0]
    return {v.name: max(1.0, per_step[v.name] / alone_s)}


def _logged_step(run_dir: Path) -> int:
    """The last step a run has logged (its ``metrics.csv``), 0 before the first row."""
    try:
        with open(run_dir / "metrics.csv", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            last = f.read().decode(errors="replace").strip().splitlines()[-1]
        return int(float(last.split(",", 1)[0]))
    except (OSError, IndexError, ValueError):
        return 0


def _may_start(expected_s: float, now: float, end: float, grace_s: float, seed: int, completes_seed: bool) -> bool:
    """Whether a run of ``expected_s`` seconds starts at ``now``: seed 0 always; a run that completes
    its seed (every other variant of the seed started) if it ends within ``grace_s`` after ``end``
    (a finished partner without it would be wasted, a lost seed costs more than a short overrun);
    any other if it ends by ``end``."""
    return seed == 0 or now + expected_s <= end + (grace_s if completes_seed else 0.0)


def _run_parallel(c: AblationConfig, jobs: list[tuple["Variant", int]], steps: int, out: Path,
                  per_step: dict[str, float], pool: ProcessPoolExecutor, workers: int, eval_s: float,
                  end: float, grace_s: float = 0.0, check: bool = False) -> None:
    """Train and evaluate ``jobs`` on the pool's workers, a new job as a worker comes free; a job that
    could not end in time (:func:`_may_start`; ``end`` is the whole budget: a run may use the time
    kept for the report) is not started. ``check``: the first run on every worker checks the plan;
    when one finds it off, no job starts any more and, once the runs under way have stopped,
    :class:`PlanChanged` is raised with their ratios (the median per variant). One progress bar over
    all runs' steps."""
    from tqdm.auto import tqdm

    todo, running, skipped, ratios = list(jobs), {}, set(), {}
    checks = workers if check else 0
    bar = tqdm(total=steps * len(jobs), desc=f"{len(jobs)} runs on {workers} processes", dynamic_ncols=True,
               mininterval=1.0, disable=not c.progress)
    shown = 0
    try:
        while todo or running:
            while todo and len(running) < workers and not ratios:
                v, seed = todo.pop(0)
                expected = steps * per_step.get(v.name, 0.0) + eval_s
                # every other variant of this seed started (the jobs left are not started yet)
                completes = not any(s == seed and ((w.name, s) in skipped or (w, s) in todo) for w, s in jobs)
                if per_step and not _may_start(expected, time.perf_counter(), end, grace_s, seed, completes):
                    log.warning("budget: not starting %s seed %d (about %.0f s, %.0f s left)", v.name, seed, expected,
                                end - time.perf_counter())
                    skipped.add((v.name, seed))
                    continue
                planned = steps * per_step[v.name] if per_step.get(v.name) else None
                check_s = per_step.get(v.name) if checks > 0 else None
                checks -= 1
                running[pool.submit(_run_in_process, replace(c, progress=False), v, seed, steps, out, planned,
                                    check_s)] = (v, seed)
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for f in done:
                running.pop(f)
                try:
                    f.result()  # a failed run stops the ablation with its error
                except PlanChanged as e:
                    for k, r in e.ratios.items():
                        ratios.setdefault(k, []).extend([] if r is None else [r])
            if ratios and not running:
                break
            finished = sum(steps for v, s in jobs if (_run_dir(out, v, s) / "result.json").is_file())
            now = finished + sum(min(steps, _logged_step(_run_dir(out, v, s))) for v, s in running.values())
            bar.update(now - shown)
            shown = now
    finally:
        bar.close()
    if ratios:
        raise PlanChanged({k: float(np.median(r)) if r else None for k, r in ratios.items()})


def _run_sequential(c: AblationConfig, jobs: list[tuple["Variant", int]], steps: int, out: Path,
                    per_step: dict[str, float], governor: Optional[ThreadGovernor], deadline: float,
                    check: Optional[Any] = None) -> None:
    """Train and evaluate ``jobs`` in this process, seed by seed, stopping after a round when the next
    one would not end by ``deadline``. ``check``: a stop flag; then the first run checks the plan."""
    for seed in sorted({s for _, s in jobs}):
        t_round = time.perf_counter()
        for v, s in jobs:
            if s == seed:
                planned = steps * per_step[v.name] if per_step.get(v.name) else None
                first = check is not None and (v, s) == jobs[0]
                _run_one(c, v, seed, steps, out, planned, governor, (per_step[v.name], check) if first else None)
        round_s = time.perf_counter() - t_round
        if c.steps is None and seed + 1 < c.seeds and time.perf_counter() + round_s > deadline:
            log.warning("budget: %d of %d seeds done (a round takes %.0f s, %.0f s left); comparing those",
                        seed + 1, c.seeds, round_s, deadline - time.perf_counter())
            break


def run_ablation(c: AblationConfig, t_start: Optional[float] = None) -> dict[str, Any]:
    """Train, evaluate and compare every variant over the seeds; write ``summary.json`` and return
    ``{"results": {variant: {seed: result}}, "summary", "steps", "seeds_done", "threads", ...}``."""

    t_start = time.perf_counter() if t_start is None else t_start
    variants = [parse_variant(s, c.preset) for s in c.variants]
    # missing packages stop the run now, not after minutes of training
    for module in ("scipy", "sklearn", "matplotlib") + (("skimage",) if c.data is None or c.eval_data is None else ()):
        require(module, "an ablation (t-tests, t-SNE, plots, the embedded photos)", extra="demo")
    out, old = _prepare_out(c)
    workers, threads = _plan_workers(c)
    timings: dict[int, float] = {}
    per_step: dict[str, float] = {}
    calibrated: dict[str, float] = {}
    alone: dict[str, float] = {}  # by variant: a run left alone is this many times faster (several workers)
    replan: Optional[dict[str, Any]] = None
    pool = None
    if workers > 1:
        ctx = get_context("spawn")
        runs = ctx.Value("i", 0) if c.threads is None else None  # runs under way, when their threads may change
        stop = ctx.Value("i", 0)
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(threads, logging.getLogger().getEffectiveLevel(), runs, stop))
    else:
        stop = SimpleNamespace(value=0)
    try:
        eval_s = _eval_estimate_s(c, threads or torch.get_num_threads())
        if old is not None:
            steps = old["steps"]
            threads = old["threads"] if workers == 1 else threads
        elif c.steps is not None:
            steps = c.steps
        else:
            with tempfile.TemporaryDirectory() as tmp:
                if pool is None:
                    per_step, threads, timings = _calibrate(c, variants, Path(tmp))
                    torch.set_num_threads(threads)
                    heldout = [_warm_heldout(c)]
                else:  # every variant at once, as the runs will train: side by side
                    futs = [pool.submit(_calibrate_one, c, v, tmp, c.calibrate_s) for v in variants]
                    per_step = {v.name: f.result()[0] for v, f in zip(variants, futs)}
                    heldout = [f.result()[1] for f in futs]
                    if c.threads is None and (os.cpu_count() or 1) > threads:  # a run left alone takes more cores
                        alone = _alone_speedup(c, variants, per_step, pool, tmp)
            # the originals' features are computed (in every process, unless a pool worker calibrated
            # no variant: then its first evaluation computes them, at most once more than planned)
            eval_s = _eval_estimate_s(c, threads, None if None in heldout else max(heldout, key=lambda h: h[0] / h[1]))
            jobs = _job_order(c, variants, per_step, workers)
            left = c.minutes * 60 - (time.perf_counter() - t_start) - c.report_reserve_s
            steps = _steps_that_fit(left * (1 - c.slack), jobs, per_step, eval_s, workers, alone)
            log.info("%s s per step%s: %d steps per run fit %d seeds of %d variants on %d process(es) in %.1f minutes",
                     {k: round(t, 3) for k, t in per_step.items()},
                     "".join(f" ({k} {f:.2f}x faster alone)" for k, f in alone.items()), steps, c.seeds, len(variants),
                     workers, c.minutes)
            if steps < 50:
                log.warning("the budget buys only %d steps per run: the comparison will show little", steps)
        deadline = t_start + c.minutes * 60 - c.report_reserve_s
        jobs = [(v, s) for v, s in _job_order(c, variants, per_step, workers)
                if not (_run_dir(out, v, s) / "result.json").is_file()]
        governor = None
        if pool is None:
            torch.set_num_threads(threads)
            # one governor for every run: it keeps the faster of 1 and all cores as the machine's load changes
            governor = None if c.threads is not None else ThreadGovernor(thread_candidates(), speeds=timings or None)
        # calibration may have timed a passing load: the first runs check it once (not on resume or fixed steps)
        check, calibrated = bool(per_step) and c.replan_factor is not None, dict(per_step)
        while True:
            _write_json(out / "ablation.json", {"plan": _plan(c), "steps": steps, "threads": threads, "workers": workers})
            try:
                if pool is not None:
                    _run_parallel(c, jobs, steps, out, per_step, pool, workers, eval_s,
                                  t_start + c.minutes * 60 if c.steps is None else math.inf, c.slack * c.minutes * 60,
                                  check)
                else:
                    _run_sequential(c, jobs, steps, out, per_step, governor, deadline, stop if check else None)
                break
            except PlanChanged as e:  # plan again from the measured speeds, once
                check, stop.value, before = False, 0, steps
                measured = {k: r for k, r in e.ratios.items() if r is not None}
                others = float(np.median(list(measured.values())))  # variants no first run timed
                per_step = {k: t * measured.get(k, others) for k, t in per_step.items()}
                left = c.minutes * 60 - (time.perf_counter() - t_start) - c.report_reserve_s
                steps = _steps_that_fit(left * (1 - c.slack), jobs, per_step, eval_s, workers, alone)
                replan = {"ratios": measured, "steps_before": before, "steps_after": steps,
                          "after_s": time.perf_counter() - t_start}
                log.warning("the first runs took %s times their calibrated time per step: planned again, %d steps "
                            "per run instead of %d", {k: round(r, 2) for k, r in measured.items()}, steps, before)
                if steps < 50:
                    log.warning("the budget buys only %d steps per run: the comparison will show little", steps)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    results: dict[str, dict[int, dict[str, Any]]] = {v.name: {} for v in variants}
    for v in variants:
        for seed in range(c.seeds):
            done = _run_dir(out, v, seed) / "result.json"
            if done.is_file():
                results[v.name][seed] = json.loads(done.read_text())  # as a resumed run reads it (string keys)
    # the seeds every variant finished (all of them unless the budget ran out)
    complete = [s for s in range(c.seeds) if all(s in results[v.name] for v in variants)]
    seeds_done = len(complete)
    summary = summarize({k: {s: r for s, r in v.items() if s in complete} for k, v in results.items()}, c.baseline)
    info = {"steps": steps, "seeds_done": seeds_done, "seeds_asked": c.seeds, "threads": threads, "workers": workers,
            "calibrated_s_per_step": calibrated, "alone_speedup": alone,
            "replan": replan,
            "thread_timings_s": timings, "thread_switches": governor.switches if governor else [],
            "budget_s": None if c.steps is not None else c.minutes * 60,
            "seconds": time.perf_counter() - t_start, "cpu": cpu_model(),
            "machine": platform.machine(), "torch": torch.__version__}
    info["load_notes"] = load_notes(info, results)
    for line in info["load_notes"]:
        log.warning("%s", line)
    _write_json(out / "summary.json", {**info, "summary": summary})
    return {"results": results, "summary": summary, "variants": variants, "out": out, **info}


def load_notes(info: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """What the machine's load did to a run, in sentences for the console and the report (empty on
    an idle machine): stalled all-core steps at the start, a plan made again, thread switches, runs
    slower than calibrated, a budget overrun."""
    notes = []
    t = {int(k): v for k, v in info.get("thread_timings_s", {}).items()}
    if len(t) > 1 and t[max(t)] > t[min(t)]:
        notes.append(f"At the start {max(t)} threads took {t[max(t)]:.2f} s per step against {t[min(t)]:.2f} s for "
                     f"{min(t)}: another process was using the CPU, so the runs started with {min(t)} thread(s) "
                     f"and fewer steps than an idle machine would give.")
    r = info.get("replan")
    if r:
        took = ", ".join(f"{k} {x:.2f}x" for k, x in r["ratios"].items())
        notes.append(f"The first runs took another time per step than calibrated ({took}; the machine's load changed "
                     f"after calibration): {r['after_s']:.0f} s into the budget every run was started again, with "
                     f"{r['steps_after']} steps instead of {r['steps_before']}.")
    if info.get("thread_switches"):
        notes.append("The CPU load changed during the runs; thread count switches: "
                     + ", ".join(f"{a} -> {b}" for a, b in info["thread_switches"]) + ".")
    slow = [(r["train_seconds"] / r["train_seconds_planned"], name, seed) for name, runs in results.items()
            for seed, r in runs.items() if r.get("train_seconds_planned")]
    if slow and max(slow)[0] > 1.5:
        ratio, name, seed = max(slow)
        notes.append(f"Training ran up to {ratio:.1f}x slower than calibrated ({name}, seed {seed}): the machine was "
                     f"busy. Steps were fixed at the start, so the comparison stays paired, but it took longer.")
    budget = info.get("budget_s")
    if budget and info["seconds"] > 1.1 * budget:
        notes.append(f"The whole run took {info['seconds'] / 60:.1f} min against a budget of {budget / 60:.1f} min.")
    return notes


def _eval_estimate_s(c: AblationConfig, threads: int, heldout: Optional[tuple[float, int]] = None) -> float:
    """The time of one run's evaluation: Inception over its reconstructions of the held-out images
    (``heldout``: the seconds and images of :func:`_warm_heldout`; the originals' features are cached)
    and the rest (the model's passes over held-out and training crops, t-SNE), for the demo's
    runs 3 s at one thread where an Inception image took 0.2 s (AMD EPYC), i.e. 15 images' time.
    Without a measurement: the earlier rough model (19 s with 2 threads on an idle machine for the
    demo's 96 crops)."""
    if heldout is not None:
        seconds, n = heldout
        return (n + 10 + (5 * c.tsne_runs if c.uniformity else 0)) * seconds / max(1, n)
    n = 3 * c.eval_crops_per_photo if c.eval_data is None else 500
    two_threads = 2.0 + n * (0.1 if c.kid else 0.02) + (8.0 * c.tsne_runs if c.uniformity else 0.0)
    return two_threads * 2 / min(2, max(1, threads))


# ---- the report ------------------------------------------------------------------------------------

def write_report(res: dict[str, Any], c: AblationConfig, title: str, intro: str) -> Path:
    """``report.html`` / ``report.md`` in the output folder: both tables, what they support, the
    reconstructions of seed 0 of every variant on the same held-out crops, the pyramid, per-scale
    PSNR, training and held-out curves, t-SNE plots."""

    out, summary, variants = Path(res["out"]), res["summary"], res["variants"]
    t1, t2 = summary_tables(summary, c.baseline)
    rep = Report(title)
    rep.add_paragraph(intro)
    rep.add_table(t1)
    rep.add_table(t2)
    rep.add_heading("What these numbers support")
    for line in conclusions(summary, c.baseline):
        rep.add_paragraph(line)
    if res.get("load_notes"):
        rep.add_heading("Machine load")
        for line in res["load_notes"]:
            rep.add_paragraph(line)
    if res["seeds_done"] < res["seeds_asked"]:
        rep.add_paragraph(f"The budget bought {res['seeds_done']} of the {res['seeds_asked']} seeds asked for.")
    rep.add_paragraph("rFID is not reported: on a few hundred crops of three photos the 2048-dimensional "
                      "covariance is rank-deficient and FID is biased by the image count; rKID (unbiased) "
                      "stands in for it. A miniature trained for minutes is not the paper's 100-epoch "
                      "ImageNet model: read directions, not values.")
    first = {v.name: out / "runs" / v.name / "seed0" for v in variants}
    samples = {k: torch.load(d / "samples.pt", weights_only=True) for k, d in first.items() if (d / "samples.pt").is_file()}
    if samples and next(iter(samples.values()))["inputs"] is not None:
        inputs = next(iter(samples.values()))["inputs"]
        reconstruction_grid(inputs, {k: s["pyramids"] for k, s in samples.items()}, out / "reconstructions.png")
        rep.add_image(out / "reconstructions.png", "seed 0 of every variant on the same held-out crops: input, then "
                                                   "each variant's scales coarse to fine")
        multi = [k for k, s in samples.items() if len(s["pyramids"]) > 1]
        if multi:
            pyramid_strip([p[0] for p in samples[multi[0]]["pyramids"]], out / "pyramid.png")
            rep.add_image(out / "pyramid.png", f"the multi-scale pyramid of one held-out crop ({multi[0]}, seed 0)")
    photos = {k: torch.load(d / "full_photo.pt", weights_only=True) for k, d in first.items() if (d / "full_photo.pt").is_file()}
    if photos:
        ref = next(iter(photos.values()))
        pics = [tensor_to_pil(ref["input"].clamp(-1, 1))] + [tensor_to_pil(p["recon"].clamp(-1, 1)) for p in photos.values()]
        strip = Image.new("RGB", (sum(p.width for p in pics) + 8 * (len(pics) - 1), pics[0].height), "white")
        for i, p in enumerate(pics):
            strip.paste(p, (i * (p.width + 8), 0))
        strip.save(out / "full_photo.png")
        h, w = ref["input"].shape[-2:]
        rep.add_image(out / "full_photo.png", f"the whole held-out photo {ref['name']} ({w}x{h}, its own aspect ratio), "
                      "then seed 0 of " + ", ".join(f"{k} ({float(p['psnr']):.2f} dB)" for k, p in photos.items()) +
                      f": overlapping {c.preset} tiles of the training size, blended (reconstruct --mode tile)")
    per_scale = {k: {int(s): v for s, v in row["psnr_per_scale"].items()}
                 for k, row in summary["variants"].items() if "psnr_per_scale" in row}
    if per_scale:
        scales = sorted({s for v in per_scale.values() for s in v})
        plot_per_scale_metric(per_scale, scales, out / "psnr_per_scale.png", "PSNR (dB)")
        rep.add_image(out / "psnr_per_scale.png", "held-out PSNR of every scale (mean over seeds) against the input "
                                                  "downsampled to that size")
    csvs = {k: d / "metrics.csv" for k, d in first.items() if (d / "metrics.csv").is_file()}
    if csvs:
        size = HieraTok.preset_config(c.preset).image_size
        cols = [set(read_csv_log(p)) for p in csvs.values()]
        keys = [k for k in (f"l1_s{size}", f"heldout_psnr_s{size}", "heldout_color_err", "posterior_snr")
                if all(k in cs for cs in cols)]
        if keys:
            plot_loss_curves(csvs, out / "curves.png", keys=keys, log_y={f"l1_s{size}"})
            rep.add_image(out / "curves.png", "seed 0 of every variant: finest-scale L1 on training batches, and on a "
                                              "fixed held-out batch the finest-scale PSNR and the mean-colour error")
    for k, d in first.items():
        if (d / "tsne.npz").is_file():
            z = np.load(d / "tsne.npz")
            u = summary["variants"][k]
            cv = u.get("density_cv", {}).get("mean", float("nan"))
            plot_tsne(z["points_2d"], z["densities"], out / f"tsne_{k}.png", title=f"{k}, seed 0 (density CV, mean over seeds: {cv:.3f})")
            rep.add_image(out / f"tsne_{k}.png", f"t-SNE of {k} latents (one position per held-out crop, VA-VAE "
                                                 "protocol), coloured by KDE density")
    rep.add_key_values({"steps per run": res["steps"], "seeds": f"{res['seeds_done']} of {res['seeds_asked']}",
                        "batch size": c.batch_size, "variants": ", ".join(f"{v.name} ({v.preset} {v.overrides or ''})".strip()
                                                                          for v in variants),
                        "processes x threads": f"{res.get('workers', 1)} x {res['threads']}", "total time (s)": round(res["seconds"], 1), "cpu": res["cpu"],
                        "torch": res["torch"]}, title="Run")
    rep.write(out)
    return out / "report.html"
