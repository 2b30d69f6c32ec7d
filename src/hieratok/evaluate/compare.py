"""Side-by-side comparison of evaluated runs in the layout of the paper's Table 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..report import MetricSpec, comparison_table

__all__ = ["compare_runs", "load_metrics"]


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Merge the metric files of a run or evaluation folder (recon, latents, generation)."""
    p = Path(path)
    files = [p] if p.is_file() else [f for name in ("metrics.json", "latents.json", "gen_metrics.json")
                                     for f in [p / name, p / "eval" / name] if f.is_file()]
    if not files:
        raise FileNotFoundError(f"{p}: no metrics.json / latents.json / gen_metrics.json (run `hieratok eval` first)")
    out: dict[str, Any] = {}
    for f in files:
        out.update(json.loads(f.read_text()))
    return out


def compare_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None, baseline: int = 0) -> Any:
    """A :class:`~hieratok.report.ComparisonTable` of rFID, PSNR, perceptual, SSIM, gFID, IS (and
    uniformity when measured), with every run's difference to the ``baseline``-th one."""
    metrics = [load_metrics(p) for p in paths]
    names = list(names) if names else [Path(p).name or str(p) for p in paths]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    pnames = {m.get("perceptual_name") for m in metrics} - {None, "none"}
    pkey = pnames.pop() if len(pnames) == 1 else None
    specs = [MetricSpec("rfid", "rFID", False, ".2f"), MetricSpec("psnr", "PSNR", True, ".2f")]
    if pkey:
        specs.append(MetricSpec(pkey, "LPIPS" if pkey == "lpips-vgg" else pkey, False, ".3f"))
    specs += [MetricSpec("ssim", "SSIM", True, ".3f"), MetricSpec("gfid", "gFID", False, ".2f"),
              MetricSpec("is", "IS", True, ".1f"), MetricSpec("density_cv", "density CV", False, ".3f"),
              MetricSpec("gini", "Gini", False, ".3f"), MetricSpec("normalized_entropy", "norm. entropy", True, ".3f")]
    present = [s for s in specs if any(m.get(s.key) is not None for m in metrics)]
    rows = {n: {s.key: m.get(s.key) for s in present} for n, m in zip(names, metrics)}
    return comparison_table(rows, baseline=names[baseline], metrics=present)
