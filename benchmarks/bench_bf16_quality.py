"""Sample quality of ``--precision bf16`` against fp32 (issue 16): a tiny DiT (``--generator dit``,
the default) or a tiny HAR GPT on ResTok codes (``--generator har``) trained here, sampled both
ways with the same seeds, scored with KID and FID against real crops.

    python benchmarks/bench_bf16_quality.py --json benchmarks/results/bf16_quality_dit.json   # ~35 min, 2 CPU cores
    python benchmarks/bench_bf16_quality.py --generator har --json benchmarks/results/bf16_quality_har.json  # ~37 min (20 of them the tokenizer)
    python benchmarks/bench_bf16_quality.py --quick --out /tmp/bf16q/quick                    # the chain only, ~3 min
    python benchmarks/bench_bf16_quality.py --tokenizer runs/tokenizer ...                    # skip step 1

The chain, every step through the ``hieratok`` command (one subprocess each) or the function behind it
(:data:`CHAINS` holds what differs between the two generators):

1. ``hieratok train --preset tiny`` (DiT) or ``--task restok --preset restok-tiny`` (HAR) on the
   embedded photos, or ``--tokenizer PATH``;
2. ``hieratok cache-latents`` of embedded training crops: latents of the HieraTok, codes of the
   ResTok (one centre crop per image, the distribution the reference crops below come from; not
   ``--ten-crop``). The DiT task reads the latents' mean and std from the cache, so
   ``--update-tokenizer`` is not needed (it only feeds diffusers interop);
3. ``hieratok train --task dit --preset dit-tiny --data CACHE``, or ``--task ar --preset gpt-tiny
   --data CACHE objective.layout=har`` (next-hierarchy, the AR task's default layout, set explicitly);
4. :func:`hieratok.workflows.generation.sample_to_folder` (what ``hieratok sample`` runs) of K
   images per seed with ``precision="fp32"`` and ``"bf16"``: the generator and the decoding tokenizer
   under bf16 autocast, the same seeds, labels, guidance and (DiT) sampler steps on both sides. The
   order of the two alternates from seed to seed, so drifting machine load hits both alike. HAR
   also: the codes of every seed sampled again by :func:`sampled_codes` (the sampler called
   directly, as ``sample_to_folder`` calls it; the ADM ``samples.npz`` holds images only) in both
   precisions, and the share of codes that agree position by position;
5. Inception pool3 features (:class:`hieratok.metrics.InceptionFeatures`, always exact fp32) of
   every sample set and of a reference set of real embedded-photo crops at the tokenizer's size
   (another draw than the cached crops). Per seed: KID and FID of each set against the reference,
   their paired difference bf16 - fp32, KID and FID between the fp32 and the bf16 set of the same
   seed, and the mean absolute 8-bit pixel difference between the fp32 and the bf16 image of the
   same seed and index.

With ``--generator har`` the tokenizer step trains ``restok-tiny`` for 2,000 steps (20 min here)
at commitment beta 0 and ``init_std`` 0.08, not the release's 0.25 and 0.02. With the release's
values its codes collapse to one sequence for every image in CPU-sized runs, and every sample
decodes to nearly the same image. BENCHMARKS.md ("Why restok-tiny's codes collapse") has the
mechanism and the runs behind these values. If the decoder ignores its codes anyway (for example
with ``--tok-steps`` far below the default), the metrics against real crops show bf16 rounding in
the decoder, not sample quality: ``seed_matters`` is then false and the report warns.

Two context rows put those numbers on a scale: K real crops of a third draw against the reference
(the floor at this sample count), and the fp32 sets of two different seeds against each other (how
far a fresh draw of noise moves the metrics).

KID (Binkowski et al. 2018) has an unbiased estimator, so it means the same at any sample count.
FID of a few hundred images against 2048-d features is biased upwards by the small count: both
sides of a comparison here have the same count, so differences are fair, but the absolute values
are not comparable with published FIDs. A direction ("bf16 worse" / "bf16 better") is claimed only
when every seed's difference has the same sign and their mean exceeds their standard deviation
over seeds (:func:`direction`).

Timings: wall time of each ``sample_to_folder`` call (loading, sampling, decoding, writing PNGs and
the npz), with the share of the CPUs other processes used meanwhile. A CPU without AVX512-BF16 or
AMX-BF16 emulates bf16 (``bf16_status``, recorded): bf16 timings from such a CPU are not bf16 speed.

Legend: N images, H height, W width, D feature dim.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Samples, machine_info, time_once, worker_env, write_json  # noqa: E402
from bench_restok_vs_official import bf16_status, code_agreement  # noqa: E402

import hieratok  # noqa: E402
from hieratok.data import EmbeddedPhotos, tensor_to_pil  # noqa: E402
from hieratok.data.latent_cache import read_cache_meta  # noqa: E402
from hieratok.generators.autoregressive import ARObjective, sample_layout  # noqa: E402
from hieratok.metrics import (  # noqa: E402
    FeatureStats,
    InceptionFeatures,
    frechet_distance,
    iter_npz_images,
    kernel_inception_distance,
)
from hieratok.precision import inference_precision  # noqa: E402
from hieratok.registry import GENERATORS, TOKENIZERS, load_model, model_class  # noqa: E402
from hieratok.report.images import save_samples_grid  # noqa: E402
from hieratok.workflows.generation import sample_batch, sample_to_folder  # noqa: E402

PRECISIONS = ("fp32", "bf16")
SRC = str(Path(hieratok.__file__).resolve().parents[1])  # the subprocesses import this same hieratok

# What differs between the two chains; options left unset on the command line take these values.
CHAINS: dict[str, dict[str, Any]] = {
    "dit": dict(name="DiT", tok_task="hieratok", tok_preset="tiny", tok_steps=200, gen_task="dit", gen_preset="dit-tiny",
                gen_steps=1000, gen_batch=64, gen_lr=1e-3, sample_steps=50, num=128, seeds=3, out="/tmp/bf16q/run"),
    # the GPT is cheap to train and to sample (64 px, 32 codes in 7 passes: groups 1, 1, 1, 1, 4, 8, 16); scoring dominates
    "har": dict(name="HAR", tok_task="restok", tok_preset="restok-tiny", tok_steps=2000, gen_task="ar",
                gen_preset="gpt-tiny", gen_steps=2000, gen_batch=64, gen_lr=1e-3, sample_steps=None, num=256, seeds=5,
                out="/tmp/bf16q/har"),
}
# task-specific overrides of the trainings. ResTok: its task's 5k warm-up steps would outlast the run
# (null: warmup_ratio, as the HieraTok task). At the preset's init_std 0.02 (gain 0.02 * sqrt(64) per
# linear, against the release's 0.02 * sqrt(1024)) the decoder passes no code information at the
# start. While it fits the mean image, the commitment term pulls every latent onto one code, and the
# codes never recover. 0.08 is the release's gain at width 64; beta 0 removes that pull. (BENCHMARKS.md)
# AR: its default layout (HAR) named.
EXTRA_OVERRIDES = {"restok": ["optim.warmup_steps=null", "model.init_std=0.08", "model.commitment_beta=0"],
                   "ar": ["objective.layout=har"]}

# --quick: a few minutes, to check the chain (its numbers mean nothing)
QUICK = dict(tok_steps=20, cache_num=128, gen_steps=30, gen_batch=32, num=16, seeds=2, sample_steps=5,
             ref_num=32, batch_size=16)


# ------------------------------------------------------------------------------------------------
# Summaries (pure; tests/benchmarks/test_bench_bf16_quality.py)
# ------------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one value) of ``values``."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_std of no values")
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def direction(diffs: Sequence[float], higher_is_worse: bool = True) -> str:
    """What per-seed differences bf16 - fp32 support: ``"bf16 worse"`` / ``"bf16 better"`` when every
    difference has the same sign and their mean exceeds their standard deviation over seeds, else
    ``"no direction"`` (within the seed spread; also with fewer than two seeds)."""
    d = [float(x) for x in diffs]
    if len(d) < 2:
        return "no direction"
    s = mean_std(d)
    same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
    if not same_sign or abs(s["mean"]) <= s["std"]:
        return "no direction"
    return "bf16 worse" if (s["mean"] > 0) == higher_is_worse else "bf16 better"


def paired_summary(fp32: Sequence[float], bf16: Sequence[float], higher_is_worse: bool = True) -> dict[str, Any]:
    """Per-seed values of both precisions (same seeds, same order) -> mean +- std of each, of the
    paired differences bf16 - fp32, and the :func:`direction` they support."""
    if len(fp32) != len(bf16) or not fp32:
        raise ValueError(f"need the same non-zero number of seeds on both sides, got {len(fp32)} and {len(bf16)}")
    diffs = [float(b) - float(a) for a, b in zip(fp32, bf16)]
    return {"fp32": mean_std(fp32), "bf16": mean_std(bf16), "diff": mean_std(diffs), "diffs": diffs,
            "direction": direction(diffs, higher_is_worse)}


def pixel_difference(a_NHWC: np.ndarray, b_NHWC: np.ndarray) -> dict[str, Any]:
    """How far two uint8 sample sets of the same seeds differ, image ``i`` against image ``i``."""
    if a_NHWC.shape != b_NHWC.shape or a_NHWC.dtype != np.uint8 or b_NHWC.dtype != np.uint8 or a_NHWC.ndim != 4:
        raise ValueError(f"need two uint8 (N, H, W, C) arrays of one shape, got {a_NHWC.dtype} {a_NHWC.shape} "
                         f"and {b_NHWC.dtype} {b_NHWC.shape}")
    d = np.abs(a_NHWC.astype(np.int16) - b_NHWC.astype(np.int16))
    per_image = d.reshape(d.shape[0], -1).mean(1)
    return {"mean_abs": float(d.mean()), "equal_values": float((d == 0).mean()), "max_abs": int(d.max()),
            "per_image_median": float(np.median(per_image)), "per_image_max": float(per_image.max()),
            "identical_images": int((per_image == 0).sum()), "num": int(d.shape[0])}


def seed_matters(summary: dict[str, Any]) -> Optional[bool]:
    """Whether a fresh draw of noise moves the fp32 samples (FID between the fp32 sets of two seeds)
    more than bf16 moves them (FID between the fp32 and bf16 sets of one seed); None with one seed.
    False: the samples hardly depend on the seed (e.g. a decoder that ignores its input), so the
    metrics against real crops show the rounding of (nearly) one image, not sample quality."""
    other = summary["fid_fp32_vs_fp32_other_seed"]
    return None if other is None else other["mean"] > summary["fid_fp32_vs_bf16_same_seed"]["mean"]


def pm(s: dict[str, Any], fmt: str = ".3f", scale: float = 1.0) -> str:
    """``"mean +- std"`` of a :func:`mean_std` dict."""
    return f"{s['mean'] * scale:{fmt}} ± {s['std'] * scale:{fmt}}"


# ------------------------------------------------------------------------------------------------
# The chain
# ------------------------------------------------------------------------------------------------

def run_cli(argv: list[str], log: Path) -> float:
    """``python -m hieratok ARGV`` in a subprocess (output to ``log``); returns its wall seconds."""
    print("$ hieratok " + " ".join(argv), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "hieratok", *argv], stdout=f, stderr=subprocess.STDOUT,
                           env=worker_env(SRC))
    if p.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"hieratok {argv[0]} failed (exit {p.returncode}); the end of {log}:\n{tail}")
    return time.perf_counter() - t


def _quiet_run(every: int) -> list[str]:
    """Overrides of a benchmark run: log every ``every`` steps, no grids, one final checkpoint, no bars."""
    return [f"log_every={every}", "image_every=0", "ckpt_every=0", "keep_last=1", "tensorboard=false", "progress=false"]


def tokenizer_argv(a: argparse.Namespace, run: Path) -> list[str]:
    """Step 1: the tiny HieraTok or ResTok on the embedded photos (the demo's batch and learning rate)."""
    size = model_class(a.tok_task).preset_config(a.tok_preset).image_size
    return ["train", "--task", a.tok_task, "--preset", a.tok_preset, "--steps", str(a.tok_steps), "--out", str(run),
            "--overwrite", "batch_size=16", f"optim.lr={a.tok_lr}", f"optim.end_lr={a.tok_lr / 10}",
            *EXTRA_OVERRIDES.get(a.tok_task, []), f"data.short_side={2 * size}", "ema_decay=0.99", "diag_every=0",
            f"seed={a.train_seed}", *_quiet_run(25)]


def cache_argv(a: argparse.Namespace, tokenizer: str, cache: Path) -> list[str]:
    """Step 2: latents (HieraTok) or codes (ResTok) of ``cache_num`` embedded training crops (the default data)."""
    return ["cache-latents", "--checkpoint", tokenizer, "--out", str(cache), "--num", str(a.cache_num)]


def generator_argv(a: argparse.Namespace, cache: Path, run: Path) -> list[str]:
    """Step 3: dit-tiny or gpt-tiny (HAR) on the cache, a constant learning rate (as DiT trains; EMA weights sampled)."""
    return ["train", "--task", a.gen_task, "--preset", a.gen_preset, "--data", str(cache), "--steps", str(a.gen_steps),
            "--out", str(run), "--overwrite", f"batch_size={a.gen_batch}", f"optim.lr={a.gen_lr}",
            f"optim.end_lr={a.gen_lr}", *EXTRA_OVERRIDES.get(a.gen_task, []), f"seed={a.train_seed}", *_quiet_run(50)]


def run_stage(a: argparse.Namespace, name: str, argv: list[str], done: Path, out: Path, stages: dict[str, Any]) -> None:
    """Run one ``hieratok`` step unless ``--reuse`` finds its result ``done`` from an earlier call."""
    if a.reuse and done.exists():
        stages[name] = {"reused": str(done)}
        return
    stages[name] = {"argv": argv, "seconds": run_cli(argv, out / "logs" / f"{name}.log")}


def train_chain(a: argparse.Namespace, out: Path, stages: dict[str, Any]) -> tuple[Path, Path]:
    """Steps 1-3; returns the cache and the generator's run folder."""
    tokenizer, cache, gen = out / "tokenizer", out / "cache", out / a.generator
    if a.tokenizer:
        stages["tokenizer"] = {"given": a.tokenizer}
    else:
        run_stage(a, "tokenizer", tokenizer_argv(a, tokenizer), tokenizer / "checkpoints" / f"step_{a.tok_steps:08d}",
                  out, stages)
    if not (a.reuse and (cache / "cache.json").is_file()):
        shutil.rmtree(cache, ignore_errors=True)
    run_stage(a, "cache", cache_argv(a, a.tokenizer or str(tokenizer), cache), cache / "cache.json", out, stages)
    run_stage(a, a.generator, generator_argv(a, cache, gen), gen / "checkpoints" / f"step_{a.gen_steps:08d}", out,
              stages)
    return cache, gen


def sample_both(a: argparse.Namespace, generator: Path, out: Path) -> dict[str, Any]:
    """Step 4: K samples per seed and precision (fresh folders: sample_to_folder would resume into old
    PNGs); the order of the precisions alternates by seed. Returns the npz paths and the timings."""
    kw = dict(num=a.num, cfg_scale=a.cfg, batch_size=a.batch_size, steps=a.sample_steps, device="cpu", progress=False)
    warm = out / "samples" / "warmup"
    for prec in PRECISIONS:  # one-time costs (first autocast region, kernel selection) out of the timings
        shutil.rmtree(warm, ignore_errors=True)
        sample_to_folder(str(generator), str(warm), **{**kw, "num": 2, "batch_size": 2,
                                                         "steps": None if a.sample_steps is None else 2}, precision=prec)
    shutil.rmtree(warm, ignore_errors=True)
    npz: dict[str, dict[int, Path]] = {p: {} for p in PRECISIONS}
    times = {p: Samples() for p in PRECISIONS}
    for i, seed in enumerate(a.seeds):
        for prec in (PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]):
            folder = out / "samples" / f"{prec}_seed{seed}"
            shutil.rmtree(folder, ignore_errors=True)
            result: list[Path] = []
            dt = time_once(lambda: result.append(sample_to_folder(str(generator), str(folder), seed=seed,
                                                                  precision=prec, **kw)), "cpu", times[prec])
            npz[prec][seed] = result[0]
            print(f"  seed {seed} {prec}: {a.num} samples in {dt:.1f} s"
                  + ("" if times[prec].other_cpu[-1] is None else f" (others used {times[prec].other_cpu[-1]:.0%} of the CPUs)"),
                  flush=True)
    # fp32 is exact: the first batch of seed 0 again gives the same PNGs, so every fp32 / bf16
    # difference below comes from bf16
    again = out / "samples" / "fp32_seed0_again"
    shutil.rmtree(again, ignore_errors=True)
    n = min(a.num, a.batch_size)
    first = load_npz(sample_to_folder(str(generator), str(again), seed=a.seeds[0], precision="fp32", **{**kw, "num": n}))
    rerun = bool(np.array_equal(first, load_npz(npz["fp32"][a.seeds[0]])[:n]))
    print(f"  fp32 rerun of the first {n} samples of seed {a.seeds[0]}: {'identical' if rerun else 'DIFFERENT'}", flush=True)
    return {"npz": npz, "times": times, "fp32_rerun_identical": rerun}


def sampled_codes(a: argparse.Namespace, model: torch.nn.Module, layout: Any, obj: ARObjective, seed: int,
                  precision: str) -> torch.Tensor:
    """The codes (K, N) that ``sample_to_folder(generator, seed=seed, ...)`` samples and decodes, sampled
    again with the same labels, per-batch generators and sampling settings as it uses."""
    codes = []
    for b in range((a.num + a.batch_size - 1) // a.batch_size):
        _, labels, g = sample_batch(b, a.num, a.batch_size, model.config.num_classes, seed)  # sample_to_folder's batch b
        with torch.inference_mode(), inference_precision(precision, "cpu"):
            codes.append(sample_layout(model, labels, layout, cfg_scale=a.cfg, generator=g, **obj.sampling_kwargs()).codes)
    return torch.cat(codes)


def code_agreements(a: argparse.Namespace, generator: Path, cache: Path, npz: dict[str, dict[int, Path]]) -> dict[str, Any]:
    """HAR: per seed, the share of the bf16 codes equal to the fp32 codes at the same position, and of
    the sequences equal throughout. Check: the fp32 codes of the first batch of the first seed, decoded,
    give that set's PNGs (``reproduce_samples``), so these are the codes behind the scored samples."""
    model, info = load_model(str(generator), expect=GENERATORS)
    obj = ARObjective.from_dict(info["train_config"].get("objective", {}))
    meta = read_cache_meta(str(cache))
    layout = obj.sequence_layout(meta["shape"][0])
    per_seed, reproduce = {}, None
    for s in a.seeds:
        codes = {p: sampled_codes(a, model, layout, obj, s, p) for p in PRECISIONS}
        per_seed[s] = code_agreement(codes["bf16"], codes["fp32"])
        print(f"  seed {s}: bf16 codes equal to fp32: {per_seed[s]['equal']}", flush=True)
        if reproduce is None:
            n = min(a.num, a.batch_size)
            tok, _ = load_model(meta["tokenizer"], expect=TOKENIZERS)
            with torch.inference_mode():
                imgs = tok.detokenize(codes["fp32"][:n])
            decoded = np.stack([np.asarray(tensor_to_pil(x.float().clamp(-1, 1))) for x in imgs])
            reproduce = bool(np.array_equal(decoded, load_npz(npz["fp32"][s])[:n]))
    same_rows = [statistics.fmean(f is None for f in r["first_difference"]) for r in per_seed.values()]
    return {"per_seed": per_seed, "rate": mean_std([r["rate"] for r in per_seed.values()]),
            "identical_sequences": mean_std(same_rows), "reproduce_samples": reproduce}


def load_npz(path: Path) -> np.ndarray:
    with np.load(path) as f:
        return f["arr_0"]  # (N, H, W, 3) uint8


def real_crops(size: int, num: int, seed: int) -> np.ndarray:
    """``num`` embedded training crops (the distribution the cache holds: no flips, short side 2 x size), uint8 NHWC."""
    ds = EmbeddedPhotos("train", size, length=num, seed=seed, hflip=False, short_side=2 * size)
    x_NCHW = torch.stack([ds[i][0] for i in range(num)])
    return ((x_NCHW + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _batches(x_NHWC: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, x_NHWC.shape[0], batch_size):
        yield torch.from_numpy(np.ascontiguousarray(x_NHWC[i:i + batch_size])).permute(0, 3, 1, 2)


def features(extractor: InceptionFeatures, batches: Iterator[torch.Tensor]) -> torch.Tensor:
    """Pool3 features (N, D) of uint8 (B, 3, H, W) batches."""
    return torch.cat([f.cpu() for f, _ in extractor.iter_features(batches)])


def distances(a_ND: torch.Tensor, b_ND: torch.Tensor) -> dict[str, float]:
    """KID (unbiased MMD^2, all images: no subsets at these counts) and FID between two feature sets."""
    ga, gb = FeatureStats().update(a_ND).to_gaussian(), FeatureStats().update(b_ND).to_gaussian()
    return {"kid": kernel_inception_distance(a_ND, b_ND, subset_size=max(len(a_ND), len(b_ND)))[0],
            "fid": frechet_distance(ga.mu, ga.sigma, gb.mu, gb.sigma)}


def write_grid(samples: dict[str, np.ndarray], real: np.ndarray, path: Path, n: int = 16) -> None:
    """Rows of 8: fp32 and bf16 samples of the same indices one above the other, then real crops."""
    def f(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 127.5 - 1

    rows, labels = [], []
    for i in range(0, min(n, len(samples["fp32"])), 8):
        for p in PRECISIONS:
            rows.append(f(samples[p][i:i + 8]))
            labels.append(f"{p} {i}-{i + 7}")
    rows.append(f(real[:8]))
    labels.append("real crops")
    save_samples_grid(torch.cat(rows), path, nrow=8, labels=labels)


def score(a: argparse.Namespace, npz: dict[str, dict[int, Path]], size: int, out: Path) -> dict[str, Any]:
    """Step 5: per-seed metrics, their summaries and the context rows."""
    extractor = InceptionFeatures(a.inception_weights)
    ref = real_crops(size, a.ref_num, a.ref_seed)
    floor = real_crops(size, a.num, a.ref_seed + 1)
    f_ref = features(extractor, _batches(ref, 50))
    f_floor = features(extractor, _batches(floor, 50))
    feats = {p: {s: features(extractor, iter_npz_images(npz[p][s], 50)) for s in a.seeds} for p in PRECISIONS}
    per_seed = []
    for s in a.seeds:
        imgs = {p: load_npz(npz[p][s]) for p in PRECISIONS}
        row: dict[str, Any] = {"seed": s}
        for p in PRECISIONS:
            row[p] = distances(feats[p][s], f_ref)
        row["fp32_vs_bf16"] = distances(feats["fp32"][s], feats["bf16"][s])
        row["pixels"] = pixel_difference(imgs["fp32"], imgs["bf16"])
        per_seed.append(row)
        if s == a.seeds[0]:
            write_grid(imgs, floor, out / f"grid_{a.generator}_seed{s}.png")
    other = [distances(feats["fp32"][s], feats["fp32"][t]) for s, t in zip(a.seeds, a.seeds[1:])]
    summary = {
        "kid_vs_real": paired_summary([r["fp32"]["kid"] for r in per_seed], [r["bf16"]["kid"] for r in per_seed]),
        "fid_vs_real": paired_summary([r["fp32"]["fid"] for r in per_seed], [r["bf16"]["fid"] for r in per_seed]),
        "kid_fp32_vs_bf16_same_seed": mean_std([r["fp32_vs_bf16"]["kid"] for r in per_seed]),
        "fid_fp32_vs_bf16_same_seed": mean_std([r["fp32_vs_bf16"]["fid"] for r in per_seed]),
        "pixel_mean_abs": mean_std([r["pixels"]["mean_abs"] for r in per_seed]),
        "pixel_per_image_max": mean_std([r["pixels"]["per_image_max"] for r in per_seed]),
        "kid_fp32_vs_fp32_other_seed": mean_std([o["kid"] for o in other]) if other else None,
        "fid_fp32_vs_fp32_other_seed": mean_std([o["fid"] for o in other]) if other else None,
    }
    summary["seed_matters"] = seed_matters(summary)
    context = {"real_vs_real": distances(f_floor, f_ref), "fp32_other_seed_pairs": other,
               "inception": {"source": extractor.source, "path": str(extractor.path)}}
    return {"per_seed": per_seed, "summary": summary, "context": context}


def timing_summary(times: dict[str, Samples]) -> dict[str, Any]:
    sec = {p: times[p].seconds for p in PRECISIONS}
    return {**{p: {"seconds": sec[p], "other_cpu": times[p].other_cpu, **mean_std(sec[p])} for p in PRECISIONS},
            "bf16_over_fp32": mean_std([b / f for f, b in zip(sec["fp32"], sec["bf16"])])}


def print_report(a: argparse.Namespace, res: dict[str, Any]) -> None:
    s, t = res["summary"], res["timing"]
    k = 1e3  # KID x 10^3, as usually printed
    steps = "" if a.sample_steps is None else f"{a.sample_steps} sampler steps, "
    print(f"\n{a.name} sample quality, K={a.num} per seed, seeds {a.seeds}, {steps}cfg {a.cfg} "
          f"(mean ± std over seeds; KID x 1e3; bf16 {'EMULATED' if res['bf16']['emulated'] else 'native'})")
    print("| | fp32 | bf16 | bf16 - fp32 | supports |\n|---|---:|---:|---:|---|")
    for key, name, sc in (("kid_vs_real", "KID vs real crops (x 1e3)", k), ("fid_vs_real", "FID vs real crops", 1.0)):
        v = s[key]
        print(f"| {name} | {pm(v['fp32'], '.2f', sc)} | {pm(v['bf16'], '.2f', sc)} | {pm(v['diff'], '.2f', sc)} "
              f"| {v['direction']} |")
    print("\n| same seed, fp32 vs bf16 | value |\n|---|---:|")
    print(f"| KID (x 1e3) | {pm(s['kid_fp32_vs_bf16_same_seed'], '.3f', k)} |")
    print(f"| FID | {pm(s['fid_fp32_vs_bf16_same_seed'], '.3f')} |")
    print(f"| mean abs pixel difference (8-bit) | {pm(s['pixel_mean_abs'], '.3f')} |")
    print(f"| largest per-image mean abs difference | {pm(s['pixel_per_image_max'], '.2f')} |")
    if res.get("codes"):
        c = res["codes"]
        print(f"| codes equal at the same position | {pm(c['rate'], '.2%')} |")
        print(f"| sequences equal throughout | {pm(c['identical_sequences'], '.2%')} |")
        print(f"(fp32 codes sampled again reproduce the fp32 PNGs: {c['reproduce_samples']})")
    if s["kid_fp32_vs_fp32_other_seed"]:
        print(f"\ncontext: fp32 vs fp32 of another seed: KID {pm(s['kid_fp32_vs_fp32_other_seed'], '.3f', k)} x 1e-3, "
              f"FID {pm(s['fid_fp32_vs_fp32_other_seed'], '.2f')}")
    if s["seed_matters"] is False:
        print("WARNING: the fp32 sets of two seeds are closer than the fp32 and bf16 sets of one seed: the samples "
              "hardly depend on the seed, so the rows against real crops do not measure sample quality")
    rr = res["context"]["real_vs_real"]
    print(f"context: {a.num} real crops vs the {a.ref_num} reference crops: KID {rr['kid'] * k:.3f} x 1e-3, FID {rr['fid']:.2f}")
    print(f"fp32 rerun of seed {a.seeds[0]}'s first batch identical: {res['fp32_rerun_identical']}")
    print(f"sampling wall time per set: fp32 {pm(t['fp32'], '.1f')} s, bf16 {pm(t['bf16'], '.1f')} s, "
          f"bf16 / fp32 {pm(t['bf16_over_fp32'], '.2f')}" + (" (bf16 EMULATED)" if res["bf16"]["emulated"] else ""))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options, with the chain's defaults (:data:`CHAINS`) for those not given, then ``--quick``'s."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", choices=sorted(CHAINS), default="dit", help="dit: dit-tiny on HieraTok latents; "
                    "har: gpt-tiny (next-hierarchy) on ResTok codes")
    ap.add_argument("--out", default=None, help="work folder: runs, cache, samples, grids, logs (default per generator)")
    ap.add_argument("--tokenizer", default=None, help="a trained tokenizer (run, checkpoint or model folder; a ResTok "
                    "for har): skip step 1")
    ap.add_argument("--tok-preset", default=None, help="default: tiny (dit), restok-tiny (har)")
    ap.add_argument("--tok-steps", type=int, default=None, help="default 200 (dit), 2000 (har)")
    ap.add_argument("--tok-lr", type=float, default=4e-4)
    ap.add_argument("--cache-num", type=int, default=2048, help="embedded training crops cached for the generator")
    ap.add_argument("--gen-steps", "--dit-steps", dest="gen_steps", type=int, default=None,
                    help="generator training steps (default 1000 dit, 2000 har)")
    ap.add_argument("--gen-batch", "--dit-batch", dest="gen_batch", type=int, default=None, help="default 64")
    ap.add_argument("--gen-lr", "--dit-lr", dest="gen_lr", type=float, default=None, help="default 1e-3")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--num", type=int, default=None, help="K: samples per seed and precision (default 128 dit, 256 har)")
    ap.add_argument("--seeds", type=int, default=None, help="sampling seeds 0 .. S-1 (default 3 dit, 5 har)")
    ap.add_argument("--sample-steps", type=int, default=None, help="DiT sampler steps (respaced ancestral), both "
                    "precisions (default 50; har: none)")
    ap.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance (1: none)")
    ap.add_argument("--batch-size", type=int, default=64, help="sampling batch")
    ap.add_argument("--ref-num", type=int, default=256, help="real crops in the reference set")
    ap.add_argument("--ref-seed", type=int, default=1, help="crop stream of the reference (the cache uses 0)")
    ap.add_argument("--inception-weights", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of sampling and scoring (the trainings adapt theirs)")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs and the cache of an earlier call in --out")
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the chain: " + json.dumps(QUICK))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    chain = CHAINS[a.generator]
    if chain["sample_steps"] is None and a.sample_steps is not None:
        ap.error(f"--sample-steps is for the DiT sampler; the {a.generator} sampler has no steps to set")
    presets = sorted(model_class(chain["tok_task"]).presets)
    if a.tok_preset is not None and a.tok_preset not in presets:
        ap.error(f"--tok-preset {a.tok_preset!r} is not a {chain['tok_task']} preset, which --generator {a.generator} "
                 f"needs: {presets}")
    for key, v in chain.items():
        if getattr(a, key, None) is None:
            setattr(a, key, v)
    if a.quick:
        for key, v in QUICK.items():
            if getattr(a, key) is not None:  # har has no sampler steps
                setattr(a, key, v)
    a.seeds = list(range(a.seeds))
    return a


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    status = bf16_status()
    if status["emulated"]:
        print(f"bf16 is EMULATED here: {status['note']}", flush=True)
    t0 = time.perf_counter()
    stages: dict[str, Any] = {}
    cache, gen = train_chain(a, out, stages)
    print(f"trained in {time.perf_counter() - t0:.0f} s; sampling", flush=True)
    sampled = sample_both(a, gen, out)
    codes = code_agreements(a, gen, cache, sampled["npz"]) if a.generator == "har" else None
    size = read_cache_meta(str(cache))["image_size"]
    print("scoring", flush=True)
    res: dict[str, Any] = {
        "machine": machine_info(), "bf16": status,
        "settings": {k: v for k, v in vars(a).items() if k != "json"}, "stages": stages,
        "tokenizer_metrics_last": _last_row(out / "tokenizer" / "metrics.csv") if not a.tokenizer else None,
        f"{a.generator}_metrics_last": _last_row(gen / "metrics.csv"),
        "fp32_rerun_identical": sampled["fp32_rerun_identical"],
        **score(a, sampled["npz"], size, out), "codes": codes, "timing": timing_summary(sampled["times"]),
        "total_seconds": None,
    }
    res["total_seconds"] = time.perf_counter() - t0
    print_report(a, res)
    print(f"total {res['total_seconds'] / 60:.1f} min; grid: {out / f'grid_{a.generator}_seed{a.seeds[0]}.png'}")
    write_json(a.json, res)


def _last_row(csv: Path) -> Optional[dict[str, str]]:
    """The last logged training row (losses, codebook use) of a run, if it wrote one."""
    if not csv.is_file():
        return None
    lines = csv.read_text().splitlines()
    return dict(zip(lines[0].split(","), lines[-1].split(","))) if len(lines) > 1 else None


if __name__ == "__main__":
    main()
