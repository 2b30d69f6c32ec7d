"""``hieratok demo``: the paper's multi- vs single-scale ablation (Table 2) in miniature.

Trains the tiny multi-scale HieraTok and its single-scale twin with the same seeds, steps and data
order on the embedded photos (or ``--data``), several seeds each, evaluates every run on crops of
held-out photos it never saw, and writes a report with mean +- std over seeds, paired differences,
what they support, reconstructions, the pyramid, training curves and t-SNE plots. It is
:func:`hieratok.ablation.run_ablation` with the variants ``single`` and ``multi``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from .ablation import AblationConfig, run_ablation, summary_tables, write_report

__all__ = ["DemoConfig", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Budget and data of the demo (defaults fit about ten minutes on two CPU cores)."""

    preset: str = "tiny"  # the multi-scale preset; its twin is "<preset>-single"
    minutes: float = 10.0  # whole budget; training gets what evaluation and the report do not need
    steps: Optional[int] = None  # fixed steps per run instead of the time budget
    seeds: int = 3
    data: Optional[str] = None  # training images; None = embedded photos
    eval_data: Optional[str] = None  # held-out images; None = embedded held-out photos
    out: str = "runs/demo"
    batch_size: int = 16
    lr: float = 4e-4
    eval_crops_per_photo: int = 32
    tsne_runs: int = 1
    threads: Optional[int] = None  # torch threads of each run process (None: cores // workers)
    workers: Optional[int] = None  # runs trained at once in their own processes (None: one per core, <= 4)
    replan_factor: Optional[float] = AblationConfig.replan_factor  # None: keep the calibrated steps
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def ablation(self) -> AblationConfig:
        return AblationConfig(preset=self.preset, variants=("single", "multi"), baseline="single", seeds=self.seeds,
                              minutes=self.minutes, steps=self.steps, data=self.data, eval_data=self.eval_data,
                              out=self.out, batch_size=self.batch_size, lr=self.lr,
                              eval_crops_per_photo=self.eval_crops_per_photo, tsne_runs=self.tsne_runs,
                              threads=self.threads, workers=self.workers, replan_factor=self.replan_factor,
                              resume=self.resume, overwrite=self.overwrite, progress=self.progress)


def run_demo(c: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; returns the ablation result with ``report`` (path) and ``tables`` added."""
    t_start = time.perf_counter()
    a = c.ablation()
    res = run_ablation(a, t_start)
    data = "the embedded photos" if c.data is None else f"the images of {c.data}"
    held = "crops of held-out photos they never saw" if c.eval_data is None else f"images of {c.eval_data}"
    n_eval = next(iter(next(iter(res["results"].values())).values()))["num_images"]
    pname = next(iter(next(iter(res["results"].values())).values())).get("perceptual_name", "none")
    intro = (f"Both tokenizers ({c.preset} and {c.preset}-single: identical encoders, "
             f"{res['variants'][1].preset} at its configured downsampler) were trained for {res['steps']} steps of "
             f"{c.batch_size} images on {data}, {res['seeds_done']} seed(s) each (seed k gives both the same data order "
             f"and encoder initialisation), then evaluated on {n_eval} {held}. The layout follows the paper's Table 2 "
             f"(PSNR, SSIM, perceptual, rKID in place of rFID) and Table 5 (latent uniformity). The perceptual column is "
             f"{pname}" + (" (not LPIPS: the LPIPS VGG weights are not on this machine)." if pname != "lpips-vgg" else "."))
    res["report"] = write_report(res, a, "HieraTok demo: multi-scale vs single-scale, in miniature", intro)
    res["tables"] = summary_tables(res["summary"], a.baseline)
    return res
