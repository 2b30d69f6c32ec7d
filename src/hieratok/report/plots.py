"""Training curves, latent t-SNE scatter and per-scale metric plots (PNG via matplotlib's Agg canvas).

Figures are built with :class:`matplotlib.figure.Figure` and an Agg canvas directly, so nothing
needs a display and pyplot's global state (current figure, backend) is left alone.

Training logs are the trainer's CSV files: a header row with a ``step`` column and one column per
logged scalar (``loss``, ``l1``, ``mse``, ``perceptual``, ``kl``, ``lr``, ...). Empty cells (a
metric not logged at that step) and non-numeric cells read as NaN; a column with no numeric cell
at all (e.g. a ``phase`` string) is dropped.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np

from .._optional import require

__all__ = [
    "read_csv_log",
    "ema_smooth",
    "plot_loss_curves",
    "plot_tsne",
    "plot_per_scale_metric",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
Columns = Mapping[str, Sequence[float] | np.ndarray]

DPI = 120


def _new_figure(width: float, height: float):
    Figure = require("matplotlib.figure", "plotting").Figure
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plotting").FigureCanvasAgg
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="white")
    logger.info("wrote %s", path)
    return path


def _to_float(cell: str) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return math.nan


def read_csv_log(path: PathLike) -> dict[str, np.ndarray]:
    """Read a trainer CSV log into ``{column: float64 array}``.

    Args:
        path: CSV file with a header row.

    Returns:
        One array per numeric column, all of the same length (one entry per data row); empty or
        non-numeric cells are NaN; columns with no numeric cell are left out.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty (expected a CSV header row)")
        header = [h.strip() for h in header]
        rows = [r for r in reader if any(cell.strip() for cell in r)]
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        col = np.array([_to_float(r[j]) if j < len(r) else math.nan for r in rows], dtype=np.float64)
        if col.size == 0 or not np.all(np.isnan(col)):
            out[name] = col
    return out


def ema_smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with start-up bias correction (TensorBoard's smoothing).

    ``s_t = weight * s_{t-1} + (1 - weight) * v_t`` with ``s_0 = 0``, divided by
    ``1 - weight**(t+1)`` so the first points are not pulled towards zero.

    Args:
        values: 1-D finite values.
        weight: Smoothing in ``[0, 1)``; 0 returns the values unchanged.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {weight}")
    v = np.asarray(values, dtype=np.float64)
    if weight == 0.0 or v.size == 0:
        return v.copy()
    out = np.empty_like(v)
    acc = 0.0
    for t, x in enumerate(v):
        acc = weight * acc + (1.0 - weight) * x
        out[t] = acc / (1.0 - weight ** (t + 1))
    return out


def _load_runs(csv_or_dict: PathLike | Mapping[str, PathLike | Columns]) -> dict[str, dict[str, np.ndarray]]:
    if isinstance(csv_or_dict, (str, os.PathLike)):
        return {Path(csv_or_dict).stem: read_csv_log(csv_or_dict)}
    if not isinstance(csv_or_dict, Mapping) or not csv_or_dict:
        raise ValueError("csv_or_dict must be a CSV path or a non-empty {run_name: csv_path or columns} dict")
    runs: dict[str, dict[str, np.ndarray]] = {}
    for name, src in csv_or_dict.items():
        if isinstance(src, Mapping):
            runs[str(name)] = {k: np.asarray(v, dtype=np.float64) for k, v in src.items()}
        else:
            runs[str(name)] = read_csv_log(src)
    return runs


def plot_loss_curves(
    csv_or_dict: PathLike | Mapping[str, PathLike | Columns],
    path: PathLike,
    keys: Sequence[str] | None = None,
    smooth: float = 0.6,
    log_y: bool | Collection[str] = False,
    step_key: str = "step",
    title: str | None = None,
) -> Path:
    """Plot training curves, one panel per metric, several runs overlaid with a legend.

    Args:
        csv_or_dict: A trainer CSV log, or ``{run_name: csv_path}`` (a value may also be an
            already loaded ``{column: values}`` dict) to overlay runs.
        path: Output image (PNG by extension).
        keys: Columns to plot; default every numeric column but ``step_key`` (union over runs).
            A requested column missing from a run's log is an error.
        smooth: EMA weight in ``[0, 1)`` (see :func:`ema_smooth`); with ``smooth > 0`` the raw
            curve is drawn faintly behind the smoothed one.
        log_y: ``True`` for a log y axis on every panel, or the names of the panels that get one
            (e.g. ``{"lr", "kl"}``).
        step_key: Name of the x column.
        title: Figure title.

    Returns:
        The written path.
    """
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    runs = _load_runs(csv_or_dict)
    for name, cols in runs.items():
        if step_key not in cols:
            raise ValueError(f"run {name!r} has no {step_key!r} column (columns: {', '.join(cols) or 'none'})")
    if keys is None:
        keys = []
        for cols in runs.values():
            keys += [k for k in cols if k != step_key and k not in keys]
        if not keys:
            raise ValueError(f"no metric columns to plot besides {step_key!r}")
    else:
        keys = list(keys)
        if not keys:
            raise ValueError("keys must name at least one column")
        for name, cols in runs.items():
            missing = [k for k in keys if k not in cols]
            if missing:
                raise ValueError(f"column(s) {missing} not in the log of run {name!r} "
                                 f"(available: {', '.join(k for k in cols if k != step_key)})")
    log_keys = set(keys) if log_y is True else set() if log_y is False else set(log_y)

    ncols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / ncols)
    fig = _new_figure(4.2 * ncols, 3.0 * nrows + (0.4 if title else 0.0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for i, key in enumerate(keys):
        ax = axes[i // ncols][i % ncols]
        for colour, (name, cols) in zip(colours, runs.items()):
            if key not in cols:
                continue
            x, y = cols[step_key], cols[key]
            ok = np.isfinite(x) & np.isfinite(y)
            if key in log_keys and np.any(ok & (y <= 0)):
                # a log axis cannot show them; dropping them beats a line plunging off the axes
                logger.info("%s of run %s has values <= 0; left out on the log axis", key, name)
                ok &= y > 0
            x, y = x[ok], y[ok]
            if x.size == 0:
                continue
            marker = "o" if x.size == 1 else None
            if smooth > 0 and x.size > 1:
                ax.plot(x, y, color=colour, alpha=0.25, linewidth=1.0)
                ax.plot(x, ema_smooth(y, smooth), color=colour, linewidth=1.6, label=name)
            else:
                ax.plot(x, y, color=colour, linewidth=1.4, marker=marker, label=name)
        if key in log_keys:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel(step_key)
        ax.grid(True, alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_tsne(
    points: np.ndarray,
    density: np.ndarray,
    path: PathLike,
    title: str = "",
    point_size: float = 3.0,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> Path:
    """Scatter a 2-D (t-SNE) embedding coloured by density, with a colour bar.

    This is the latent-uniformity picture (paper Fig. 5): a uniform latent space shows an even
    colour, a clumpy one bright clusters on a dark field. Denser points are drawn last (on top).

    Args:
        points: ``(N, 2)`` embedding.
        density: ``(N,)`` density at each point (e.g. a Gaussian KDE).
        path: Output image.
        title: Axes title.
        point_size: Marker area.
        vmin: Lower end of the colour scale; set ``vmin``/``vmax`` equal across runs to compare
            two pictures on one scale.
        vmax: Upper end of the colour scale.
        cmap: Matplotlib colour map.

    Returns:
        The written path.
    """
    pts = np.asarray(points, dtype=np.float64)
    dens = np.asarray(density, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got shape {pts.shape}")
    if dens.shape != (pts.shape[0],):
        raise ValueError(f"density must be (N,) = ({pts.shape[0]},), got shape {dens.shape}")
    fig = _new_figure(5.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    order = np.argsort(dens, kind="stable")
    sc = ax.scatter(pts[order, 0], pts[order, 1], c=dens[order], s=point_size, cmap=cmap,
                    vmin=vmin, vmax=vmax, linewidths=0)
    fig.colorbar(sc, ax=ax, label="density")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_per_scale_metric(
    values: Mapping[str, Sequence[float | None] | Mapping[int, float | None]],
    scales: Sequence[int],
    path: PathLike,
    ylabel: str,
    xlabel: str = "output side (px)",
    title: str = "",
) -> Path:
    """Plot a metric per pyramid level for several runs (e.g. PSNR at 8, 16, 32, 64 px).

    Args:
        values: ``{run: [value per scale]}`` aligned with ``scales`` (``None`` = not measured), or
            ``{run: {scale: value}}`` for a run that has only some scales (a single-scale model
            has only the finest one); scale keys may be strings (``"64"``, as read from JSON).
        scales: The scales (image sides in pixels), coarse to fine; the x axis is log2.
        path: Output image.
        ylabel: Metric name for the y axis.
        xlabel: x-axis label.
        title: Axes title.

    Returns:
        The written path.
    """
    scales = [int(s) for s in scales]
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive sizes, got {scales}")
    if not values:
        raise ValueError("values must hold at least one run")
    fig = _new_figure(5.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, v) in enumerate(values.items()):
        if isinstance(v, Mapping):
            try:  # JSON object keys are strings: "8" is scale 8 ("8.5" or "8.0" is no size)
                v = {int(str(s)): t for s, t in v.items()}
            except ValueError:
                raise ValueError(f"run {name!r}: scale keys must be integer sizes, got {list(v)}") from None
            unknown = sorted(set(v) - set(scales))
            if unknown:
                raise ValueError(f"run {name!r} has values at scales {unknown} not in scales {scales}")
            y = [v.get(s, None) for s in scales]
        else:
            y = list(v)
            if len(y) != len(scales):
                raise ValueError(f"run {name!r} has {len(y)} values for {len(scales)} scales; "
                                 "pass {scale: value} for a run with only some scales")
        y_arr = np.array([math.nan if t is None else float(t) for t in y], dtype=np.float64)
        if not np.isfinite(y_arr).any():
            logger.warning("run %r has no finite value at scales %s: nothing plotted for it", name, scales)
        ax.plot(scales, y_arr, marker="o", color=f"C{i % 10}", label=str(name))
    ax.set_xscale("log", base=2)
    ax.set_xticks(scales)
    ax.set_xticklabels([str(s) for s in scales])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)
