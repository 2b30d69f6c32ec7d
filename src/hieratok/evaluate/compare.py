"""Side-by-side comparison of evaluated runs in the layout of the paper's Table 2."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import latest_checkpoint
from ..hub import METRIC_FILES as _METRIC_FILES
from ..report import MetricSpec, comparison_table

__all__ = ["compare_runs", "load_metrics"]

log = logging.getLogger(__name__)


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Merge the metric files (recon ``metrics.json``, ``latents.json``, ``gen_metrics.json``) of a
    metrics file, an evaluation folder or a run: ``path``, ``path/eval`` and, for a run, the
    ``eval`` folder of its latest checkpoint (where ``hieratok eval recon --checkpoint RUN``
    writes). A file name found in several of these folders is read from the last one (warned)."""
    p = Path(path)
    if p.is_file():
        return json.loads(p.read_text())
    folders = [p, p / "eval"]
    ckpt = latest_checkpoint(p)
    if ckpt is not None:
        folders.append(ckpt / "eval")
    out: dict[str, Any] = {}
    files = [[d / name for d in folders if (d / name).is_file()] for name in _METRIC_FILES]
    for found in files:
        if len(found) > 1:
            log.warning("%s found in %s; using %s", found[-1].name, ", ".join(map(str, found[:-1])), found[-1])
        if found:
            out.update(json.loads(found[-1].read_text()))
    if not any(files):
        raise FileNotFoundError(f"{p}: no {' / '.join(_METRIC_FILES)} in it, its eval/ or its latest checkpoint's "
                                "eval/ (run `hieratok eval` first)")
    return out


def compare_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None, baseline: int = 0) -> Any:
    """A :class:`~hieratok.report.ComparisonTable` of rFID, PSNR, perceptual, SSIM, gFID, sFID, IS,
    precision, recall and uniformity (the columns some run measured), with every run's difference
    to the ``baseline``-th one."""
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
              MetricSpec("sfid", "sFID", False, ".2f"), MetricSpec("is", "IS", True, ".1f"),
              MetricSpec("precision", "Prec.", True, ".3f"), MetricSpec("recall", "Rec.", True, ".3f"),
              MetricSpec("density_cv", "density CV", False, ".3f"),
              MetricSpec("gini", "Gini", False, ".3f"), MetricSpec("normalized_entropy", "norm. entropy", True, ".3f")]
    present = [s for s in specs if any(m.get(s.key) is not None for m in metrics)]
    rows = {n: {s.key: m.get(s.key) for s in present} for n, m in zip(names, metrics)}
    return comparison_table(rows, baseline=names[baseline], metrics=present)
