"""``hieratok demo``: the paper's multi- vs single-scale ablation (Table 2) in miniature.

Trains the tiny multi-scale HieraTok and its single-scale twin with the same seed, steps and data
order on the embedded photos (or ``--data``), evaluates both on held-out photos they never saw, and
writes a self-contained report (table with differences, reconstruction grids, pyramid, loss curves, t-SNE).
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["DemoConfig", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Budget and data of the demo (defaults fit about ten minutes on two CPU cores)."""

    preset: str = "tiny"  # the multi-scale preset; its twin is "<preset>-single"
    minutes: float = 10.0  # whole budget; training gets what evaluation does not need
    steps: Optional[int] = None  # fixed steps per model instead of the time budget
    data: Optional[str] = None  # training images; None = embedded photos
    eval_data: Optional[str] = None  # held-out images; None = embedded held-out photos
    out: str = "runs/demo"
    seed: int = 0
    batch_size: int = 16
    lr: float = 4e-4
    eval_crops_per_photo: int = 16
    tsne_points: int = 1500
    tsne_runs: int = 3
    eval_reserve_s: float = 150.0  # time kept for evaluation and the report when budgeting
    progress: bool = True


def _train_configs(c: DemoConfig, steps: int, out: str | Path) -> dict[str, Any]:
    from .train import load_config

    common = {"data.path": c.data, "seed": c.seed, "batch_size": c.batch_size, "optim.lr": c.lr,
              "optim.end_lr": c.lr / 10, "log_every": 5, "image_every": 0, "ckpt_every": 0, "keep_last": 1,
              "ema_decay": 0.99, "progress": c.progress, "tensorboard": False, "data.short_side": None,
              "steps": steps}
    if c.data is None:  # embedded photos: crops see more of each scene at twice the crop size
        from .presets import build_config

        common["data.short_side"] = 2 * build_config(c.preset).image_size
    return {name: load_config(overrides={**common, "preset": preset, "out_dir": str(Path(out) / name)})
            for name, preset in (("multi", c.preset), ("single", f"{c.preset}-single"))}


def _budget_steps(c: DemoConfig, t_start: float) -> int:
    """Steps per model that fit the time budget, timed on throw-away trainers of both twins (so the
    real runs get their whole warm-up and cosine schedule over exactly the steps they run)."""
    import tempfile

    from .train import Trainer

    warm, timed = 2, 8
    per_step = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in _train_configs(c, 10**6, tmp).values():
            t = Trainer(cfg)
            t.fit(max_steps=warm)  # first steps pay for allocation and lazy initialisation
            t0 = time.perf_counter()
            t.fit(max_steps=timed)
            per_step += (time.perf_counter() - t0) / timed
    left = c.minutes * 60 - (time.perf_counter() - t_start) - c.eval_reserve_s
    steps = max(1, int(left / per_step))
    log.info("%.2f s per step (both models): %d steps each fit the %.1f-minute budget", per_step, steps, c.minutes)
    return steps


def _train(c: DemoConfig, t_start: float) -> dict[str, Any]:
    """Train both twins for the same number of steps; returns the trainers."""
    from .train import Trainer

    steps = c.steps if c.steps is not None else _budget_steps(c, t_start)
    trainers = {k: Trainer(v) for k, v in _train_configs(c, steps, c.out).items()}
    for name, t in trainers.items():
        log.info("training %s (%s) for %d steps", name, t.cfg.preset, steps)
        t.fit()
    return trainers


def _data_text(c: DemoConfig) -> str:
    """How the report names the training images."""
    return "the embedded photos" if c.data is None else f"the images of {c.data}"


def _model_from(trainer: Any) -> torch.nn.Module:
    import copy

    from .train.parallel import unwrap

    model = copy.deepcopy(unwrap(trainer.raw["model"])).eval()
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    return model


def run_demo(c: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; returns the metrics of both models and the report path."""
    from .evaluate import ReconEvalConfig, evaluate_latents, evaluate_reconstruction
    from .evaluate.latents import encode_latents
    from .metrics import InceptionFeatures
    from .report import (Report, comparison_table, plot_loss_curves, plot_per_scale_metric, plot_tsne, pyramid_strip,
                         reconstruction_grid)
    from .report.table import MetricSpec

    t_start = time.perf_counter()
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    trainers = _train(c, t_start)
    train_s = time.perf_counter() - t_start
    models = {k: _model_from(t) for k, t in trainers.items()}
    size = models["multi"].config.image_size
    short = 2 * size if c.eval_data is None else None
    inception = InceptionFeatures()
    ecfg = ReconEvalConfig(data=c.eval_data, num=10**6, batch_size=16, keep_images=6, progress=c.progress,
                           crops_per_photo=c.eval_crops_per_photo, short_side=short)
    results: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        log.info("evaluating %s on held-out images", name)
        results[name] = evaluate_reconstruction(m, ecfg, "cpu", inception=inception)
        lat = encode_latents(m, c.eval_data, 10**6, crops_per_photo=c.eval_crops_per_photo, short_side=short)
        results[name]["uniformity"] = evaluate_latents(m, None, latents=lat, num_points=c.tsne_points,
                                                       num_runs=c.tsne_runs, seed=c.seed)
        u = results[name]["uniformity"]
        plot_tsne(u["points_2d"], u["densities"], out / f"tsne_{name}.png",
                  title=f"{name}-scale latents: CV {u['density_cv']:.3f}, Gini {u['gini']:.3f}")
        results[name].update({k: u[k] for k in ("density_cv", "gini", "normalized_entropy")})

    pname = results["multi"]["perceptual_name"]
    specs = [MetricSpec("rfid", "rFID", False, ".1f"), MetricSpec("psnr", "PSNR", True, ".2f"),
             MetricSpec(pname, pname, False, ".3f"), MetricSpec("ssim", "SSIM", True, ".3f"),
             MetricSpec("density_cv", "density CV", False, ".3f"), MetricSpec("gini", "Gini", False, ".3f"),
             MetricSpec("normalized_entropy", "norm. entropy", True, ".4f")]
    rows = {"single-scale": results["single"], "multi-scale": results["multi"]}
    table = comparison_table({k: {s.key: v.get(s.key) for s in specs} for k, v in rows.items()}, "single-scale", specs,
                             caption="Held-out photos; differences to the single-scale twin.")

    # figures
    inputs = results["multi"]["samples"]["inputs"]
    reconstruction_grid(inputs, {"single": results["single"]["samples"]["pyramids"],
                                 "multi": results["multi"]["samples"]["pyramids"]}, out / "reconstructions.png")
    pyramid_strip([p[0] for p in results["multi"]["samples"]["pyramids"]], out / "pyramid.png")
    csvs = {k: Path(t.cfg.out_dir) / "metrics.csv" for k, t in trainers.items()}
    final, pfinal = f"l1_s{size}", f"perceptual_s{size}"
    keys = [final] + ([pfinal] if pname != "none" else []) + ["kl", "lr"]
    plot_loss_curves(csvs, out / "loss_curves.png", keys=keys, log_y={final, pfinal})
    scales = list(results["multi"]["psnr_per_scale"])
    plot_per_scale_metric({"multi-scale": list(results["multi"]["psnr_per_scale"].values()),
                           "single-scale": {scales[-1]: results["single"]["psnr"]}}, scales, out / "psnr_per_scale.png",
                          "PSNR (dB)")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    total_s = time.perf_counter() - t_start
    steps = trainers["multi"].step

    rep = Report("HieraTok demo: multi-scale vs single-scale, in miniature")
    held = "crops of held-out photos they never saw" if c.eval_data is None else f"images of {c.eval_data}"
    rep.add_paragraph(
        f"Both tokenizers ({c.preset} and {c.preset}-single: identical encoders, {size}x{size} crops) were trained "
        f"for {steps} steps of {c.batch_size} images with the same seed and data order on {_data_text(c)}, "
        f"then evaluated on {results['multi']['num_images']} {held}. "
        "The layout follows the paper's Table 2 (rFID, PSNR, perceptual, SSIM) and Table 5 (latent uniformity). "
        f"The perceptual column is {pname}" + (" (not LPIPS: the LPIPS VGG weights are not on this machine)."
                                               if pname != "lpips-vgg" else "."))
    rep.add_table(table)
    if "rfid_note" in results["multi"]:
        rep.add_paragraph("Note: " + results["multi"]["rfid_note"] + ".")
    rep.add_image(out / "reconstructions.png", "held-out crops: input | single-scale reconstruction | "
                                               "multi-scale pyramid, coarse to fine (same crops for both)")
    rep.add_image(out / "pyramid.png", "the multi-scale decoder's pyramid for one held-out crop")
    rep.add_image(out / "psnr_per_scale.png", "PSNR of each scale of the multi-scale model against the input "
                                              "downsampled to that size; the single-scale twin has only the finest")
    rep.add_image(out / "loss_curves.png", f"training curves ({final} / {pfinal}: L1 and perceptual distance of the finest scale, "
                                                 "comparable across both models)")
    rep.add_image(out / "tsne_single.png", "t-SNE of single-scale latent vectors, coloured by KDE density")
    rep.add_image(out / "tsne_multi.png", "t-SNE of multi-scale latent vectors, coloured by KDE density")
    rep.add_key_values({"steps per model": steps, "batch size": c.batch_size, "train time (s)": round(train_s, 1),
                        "total time (s)": round(total_s, 1), "peak memory (GiB)": round(peak_gib, 2),
                        "Inception weights": results["multi"].get("inception_source"), "perceptual": pname,
                        "t-SNE": f"{c.tsne_points} points, {c.tsne_runs} runs, perplexity 30, 1000 iterations",
                        "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"},
                       title="Run")
    rep.write(out)
    metrics = {k: {m: v for m, v in r.items() if m not in ("samples",)} for k, r in results.items()}
    for r in metrics.values():
        r["uniformity"] = {m: v for m, v in r["uniformity"].items() if m not in ("points_2d", "densities")}
    (out / "metrics.json").write_text(json.dumps({"steps": steps, "peak_memory_gib": peak_gib, "seconds": total_s,
                                                  **metrics}, indent=2, default=float) + "\n")
    return {"table": table, "report": out / "report.html", "results": results, "steps": steps,
            "peak_memory_gib": peak_gib, "seconds": total_s}
