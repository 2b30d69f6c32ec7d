"""Training-step throughput and peak memory of HieraTok.

    python benchmarks/bench_train_step.py                          # CPU: the demo's step, tiny, small, paper preset
    python benchmarks/bench_train_step.py --json out/train.json
    python benchmarks/bench_train_step.py --compare-src /tmp/old/src   # also every row with an older checkout
    python benchmarks/bench_train_step.py --malloc-defaults        # also every row with glibc's allocator defaults
    python benchmarks/bench_train_step.py --gpu-only --gpu-batch 32 [--compile]   # on a CUDA machine

The demo's step (first table): what ``hieratok demo`` runs, through the trainer: the next batch of
the embedded photos (random crops, flips), forward, the multi-scale loss with the
EfficientNet-Lite0 perceptual term on every scale, backward, gradient clipping, AdamW, EMA, the
log accumulation; batch 16, the ``tiny`` preset (``multi``) and its single-scale twin
(``single``). Rows: each twin alone at 1 and at all threads, and both twins at once in two
processes of one thread each (the demo's schedule on several cores: ``s/step`` is each twin's
step while the other trains beside it). "Steps per model per minute" is what a schedule gives
each twin: one after the other at the faster thread count, ``60 / (multi + single)``; side by
side, ``2 * 60 / (multi + single)`` at the side-by-side step times (the longest-first order
keeps both processes busy).

A step is what the trainer does in stage 1 without the perceptual network: forward in train mode
(posterior sampled, decoder drop-path 0.1), multi-scale L1 + MSE + KL loss
(:class:`hieratok.losses.reconstruction.MultiScaleReconstructionLoss`), backward, AdamW
(betas 0.9/0.95, weight decay 0.05, fused, as the trainer builds it). Every configuration runs in a fresh subprocess, so its
``ru_maxrss`` is the peak resident memory of that training run alone (model, gradients, AdamW
state, activations). Achieved GFLOP/s counts 3x the forward FLOPs of hieratok.flops.count_flops
per image (forward + backward, dense attention count); the ceiling is a large fp32 matmul measured
in the same process right after the steps. The machine's speed can drift within seconds (a shared
host), so "%ceil paired" also times a 2048^3 matmul right after every step and reports the median
of the per-step ratios (the 2048^3 product allocates outside the steps' peak memory).

CUDA section (only with a GPU): the paper preset with bf16 autocast, fused AdamW, sdpa and flex
attention backends (``--compile`` compiles the model first); images/s, model TFLOP/s, MFU against
the H100 dense bf16 peak (989 TFLOP/s), peak CUDA memory.

Every CPU row keeps freed memory in the process as the trainer does
(:func:`hieratok.machine.keep_freed_memory`) and records its page faults and kernel seconds per
step; ``--malloc-defaults`` adds each row with glibc's defaults (its reference path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    H100_BF16_DENSE_TFLOPS,
    Samples,
    machine_info,
    matmul_gflops,
    peak_rss_mb,
    print_table,
    run_worker,
    time_once,
    wait_for_quiet,
    worker_env,
    write_json,
)

from hieratok import HieraTok  # noqa: E402
from hieratok.flops import count_flops  # noqa: E402
from hieratok.losses.reconstruction import MultiScaleReconstructionLoss, ReconLossConfig  # noqa: E402


def keep_freed_memory(a: argparse.Namespace) -> bool:
    """What the trainer does on CPU (:func:`hieratok.machine.keep_freed_memory`), unless the row
    measures glibc's defaults; a checkout from before it (``--compare-src``) had the defaults."""
    if a.malloc_defaults:
        return False
    try:
        from hieratok.machine import keep_freed_memory as keep
    except ImportError:
        return False
    return keep()


def faults_and_system_time() -> tuple[int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


def per_step_costs(faults: float, system_s: float, steps: int) -> dict[str, float]:
    return {"page_faults_per_step": faults / steps, "system_s_per_step": system_s / steps}


def costs_since(before: tuple[int, float]) -> tuple[int, float]:
    """Page faults and kernel (system) seconds since ``before`` (a :func:`faults_and_system_time`)."""
    faults, system = faults_and_system_time()
    return faults - before[0], system - before[1]


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (fresh) process: build, ``warmup`` + ``steps`` steps, report."""
    torch.set_num_threads(a.threads)
    kept = keep_freed_memory(a) if a.device == "cpu" else False
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = HieraTok.from_preset(a.preset, attn_backend=a.backend).to(dev)
    if a.reference_paths:
        model.set_fast_paths(False)
    fwd_flops = count_flops(model)["total"]
    model.train()
    loss_fn = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, perceptual_kind="none"),
                                           len(model.config.scales)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=not a.foreach_adamw)  # the trainer's AdamW: fused
    net = torch.compile(model) if a.compile else model
    size = model.config.image_size
    x = torch.rand(a.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev) * 2 - 1
    bf16 = dev.type == "cuda"

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
            loss = loss_fn(x, out["reconstructions"], out["posterior"])["loss"]
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # the steps' peak memory (reached in the warm-up) before the matrices of the paired ceiling exist
    rss = peak_rss_mb()
    samples, paired, faults, system_s = Samples(), [], 0, 0.0
    for _ in range(a.steps):  # faults and kernel time of the steps alone, not of the paired matmuls
        before = faults_and_system_time()
        time_once(step, dev, samples)
        f, s = costs_since(before)
        faults, system_s = faults + f, system_s + s
        if dev.type == "cpu":  # the machine's speed right after each step: its drift cancels in the ratio
            paired.append(matmul_gflops(2048, 1, dev)[0])
    out: dict[str, Any] = {"step_s": samples.seconds, "other_cpu": samples.other_cpu, "fwd_gflop_per_img": fwd_flops / 1e9,
                           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "peak_rss_mb": rss,
                           "kept_freed_memory": kept, "paired_ceiling_gflops": paired,
                           **per_step_costs(faults, system_s, a.steps)}
    if dev.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["ceiling_gflops"] = statistics.median(matmul_gflops(8192, 10, dev, torch.bfloat16))
    else:
        del model, opt, net
        out["ceiling_gflops"] = statistics.median(matmul_gflops(3072, 5, dev))
    return out


def demo_worker(a: argparse.Namespace) -> dict[str, Any]:
    """The demo's training step of one twin in this (fresh) process: ``warmup`` steps, then blocks
    of 5 steps (the demo logs every 5) until ``seconds`` have passed or ``steps`` blocks are timed."""
    from hieratok.ablation import AblationConfig, _train_config, parse_variant
    from hieratok.train import Trainer

    torch.set_num_threads(a.threads)
    c = AblationConfig(progress=False)
    v = parse_variant(a.variant, c.preset)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _train_config(c, v, 0, 10**6, Path(tmp) / "run")
        if hasattr(cfg, "keep_freed_memory"):  # the trainer applies it (older checkouts had glibc's defaults)
            cfg = dataclasses.replace(cfg, keep_freed_memory=not a.malloc_defaults)
        t = Trainer(cfg)
        t.fit(max_steps=a.warmup)
        samples, t_end, before = Samples(), time.perf_counter() + a.seconds, faults_and_system_time()
        while len(samples.seconds) < a.steps or time.perf_counter() < t_end:
            time_once(lambda: t.fit(max_steps=5), "cpu", samples)
            samples.seconds[-1] /= 5
    return {"step_s": samples.seconds, "other_cpu": samples.other_cpu, "peak_rss_mb": peak_rss_mb(),
            "perceptual": t.task.perceptual_name, "batch": c.batch_size,
            "kept_freed_memory": bool(getattr(cfg, "keep_freed_memory", False)),
            **per_step_costs(*costs_since(before), 5 * len(samples.seconds))}


def demo_rows(script: str, args: argparse.Namespace, src: Optional[str], malloc_defaults: bool = False) -> list[dict[str, Any]]:
    """The demo's step of both twins: alone at 1 and at ``--threads`` threads, then side by side."""
    label = ("this checkout" if src is None else src) + (MALLOC_DEFAULTS if malloc_defaults else "")
    rows = []
    base = ["--worker", "--kind", "demo", "--warmup", "2", "--steps", str(args.demo_blocks)]
    base += ["--malloc-defaults"] if malloc_defaults else []
    base += ["--seconds", "0"]
    for variant in ("multi", "single"):
        for th in sorted({1, args.threads}):
            if args.wait_quiet:
                wait_for_quiet(args.wait_quiet)
            res = run_worker(script, base + ["--variant", variant, "--threads", str(th)], src=src)
            rows.append({"code": label, "variant": variant, "schedule": f"alone, {th} thread(s)", "threads": th, **res})
    if args.threads > 1:  # both twins at once, one thread each, for the same wall time
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        procs = {v: subprocess.Popen([sys.executable, script, *base[:-1], str(args.demo_seconds), "--variant", v,
                                      "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(src))
                 for v in ("multi", "single")}
        for v, p in procs.items():
            out, err = p.communicate()
            res = json.loads(out.strip().splitlines()[-1]) if p.returncode == 0 else {"error": err.strip().splitlines()[-1]}
            rows.append({"code": label, "variant": v, "schedule": "side by side, 1 thread each", "threads": 1, **res})
    for r in rows:
        if "error" in r:
            print(f"{label}, {r['variant']}, {r['schedule']}: failed: {r['error']}")
        if "step_s" in r:
            r["s_per_step"] = statistics.median(r["step_s"])
            r["img_per_s"] = r["batch"] / r["s_per_step"]
    return rows


def demo_schedules(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps per model per minute of the two schedules, from the rows of one checkout."""
    t = {(r["variant"], r["schedule"]): r["s_per_step"] for r in rows if "s_per_step" in r}
    out = []
    alone = {s for (_, s) in t if s.startswith("alone") and ("multi", s) in t and ("single", s) in t}
    if alone:
        best = min(alone, key=lambda s: t[("multi", s)] + t[("single", s)])
        out.append({"schedule": f"one after the other ({best})", "pair_s": t[("multi", best)] + t[("single", best)]})
    side = "side by side, 1 thread each"
    if ("multi", side) in t and ("single", side) in t:
        out.append({"schedule": "side by side (2 processes)", "pair_s": (t[("multi", side)] + t[("single", side)]) / 2})
    for o in out:
        o["steps_per_model_per_min"] = 60 / o["pair_s"]
    return out


def run_config(script: str, preset: str, batch: int, steps: int, warmup: int, args: argparse.Namespace,
               device: str = "cpu", backend: str = "sdpa", reference_paths: bool = False, compile: bool = False,
               src: Optional[str] = None, malloc_defaults: bool = False) -> dict[str, Any]:
    argv = ["--worker", "--preset", preset, "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
            "--threads", str(args.threads), "--device", device, "--backend", backend]
    argv += ["--reference-paths"] if reference_paths else []
    argv += ["--malloc-defaults"] if malloc_defaults else []
    argv += ["--foreach-adamw"] if args.foreach_adamw else []
    argv += ["--compile"] if compile else []
    if device == "cpu" and args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    res = run_worker(script, argv, src=src)
    label = (("" if src is None else f"[{src}] ") + preset + (" (reference paths)" if reference_paths else "")
             + (MALLOC_DEFAULTS if malloc_defaults else "") + (" foreach AdamW" if args.foreach_adamw else ""))
    row: dict[str, Any] = {"preset": label, "device": device,
                           "backend": backend, "compile": compile, "batch": batch, "steps": steps}
    if "error" in res:
        print(f"{row['preset']} batch {batch} on {device}/{backend}: failed: {res['error']}")
        row["error"] = res["error"]
        return row
    t = statistics.median(res["step_s"])
    row.update(res)
    row.update({"s_per_step": t, "s_per_step_min": min(res["step_s"]), "img_per_s": batch / t,
                "train_gflops": 3 * res["fwd_gflop_per_img"] * batch / t})
    row["ceiling_ratio"] = row["train_gflops"] / res["ceiling_gflops"]
    if res.get("paired_ceiling_gflops"):  # each step against a 2048^3 matmul timed right after it
        flop = 3 * res["fwd_gflop_per_img"] * batch
        row["paired_ratio"] = statistics.median(flop / s / c for s, c in zip(res["step_s"], res["paired_ceiling_gflops"]))
    if device == "cuda":
        row["mfu_h100_bf16"] = row["train_gflops"] / (H100_BF16_DENSE_TFLOPS * 1e3)
    return row


MALLOC_DEFAULTS = " (glibc malloc defaults)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-batch", type=int, default=8, help="CPU batch of the tiny preset (0 skips it)")
    ap.add_argument("--tiny-steps", type=int, default=10)
    ap.add_argument("--small-batch", type=int, default=4, help="CPU batch of the small preset (0 skips it)")
    ap.add_argument("--small-steps", type=int, default=6)
    ap.add_argument("--paper-preset", default="hieratok-f16d16")
    ap.add_argument("--paper-batch", type=int, default=2, help="CPU batch of the paper preset (0 skips it)")
    ap.add_argument("--paper-steps", type=int, default=2)
    ap.add_argument("--reference-paths", action="store_true", help="also run each CPU config with the fast paths off")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc-defaults", action="store_true",
                    help="also run every row of this checkout with glibc's default allocator settings "
                         "(TrainConfig.keep_freed_memory=False: freed memory goes back to the kernel)")
    ap.add_argument("--foreach-adamw", action="store_true",
                    help="the multi-tensor (foreach) AdamW instead of the fused one the trainer uses")
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--gpu-steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model in the CUDA section")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--demo-blocks", type=int, default=6, help="timed blocks of 5 demo steps per row (0 skips the demo)")
    ap.add_argument("--demo-seconds", type=float, default=40.0, help="wall time of the side-by-side demo rows")
    ap.add_argument("--compare-src", default=None, metavar="DIR",
                    help="also run every CPU row with hieratok imported from DIR (e.g. a worktree of an older commit)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before measuring, wait up to this long for other processes to leave the CPUs idle")
    # worker mode (one configuration per fresh subprocess)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="sdpa", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="model", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="multi", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(demo_worker(args) if args.kind == "demo" else worker(args)))
        return

    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "cpu": [], "cuda": []}
    cols = [("preset", "preset", "s"), ("device", "device", "s"), ("backend", "attn", "s"), ("batch", "batch", "d"),
            ("steps", "steps", "d"), ("s_per_step", "s/step (med)", ".3f"), ("s_per_step_min", "s/step (best)", ".3f"),
            ("img_per_s", "img/s", ".2f"), ("train_gflops", "GFLOP/s", ".0f"), ("ceiling_gflops", "ceiling", ".0f"),
            ("ceiling_ratio", "%ceil", ".1%"), ("paired_ratio", "%ceil paired", ".1%"), ("page_faults_per_step", "faults/step", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f")]
    srcs = [None] + ([args.compare_src] if args.compare_src else [])
    # (checkout, glibc defaults?): this checkout, then its allocator reference, then the older checkout
    variants = [(None, False)] + ([(None, True)] if args.malloc_defaults else []) + [(s, False) for s in srcs[1:]]
    result["demo"], result["demo_schedules"] = [], {}
    if not args.gpu_only and args.demo_blocks > 0:
        print("The demo's training step (trainer: data + forward + loss with perceptual + backward + AdamW + EMA), batch 16")
        for src, malloc_defaults in variants:
            rows = demo_rows(__file__, args, src, malloc_defaults)
            result["demo"] += rows
            result["demo_schedules"][rows[0]["code"]] = demo_schedules(rows)
        print_table([r for r in result["demo"] if "error" not in r],
                    [("code", "code", "s"), ("variant", "twin", "s"), ("schedule", "schedule", "s"),
                     ("s_per_step", "s/step (med)", ".3f"), ("img_per_s", "img/s", ".1f"),
                     ("page_faults_per_step", "faults/step", ".0f"), ("system_s_per_step", "sys s/step", ".3f"),
                     ("peak_rss_mb", "peak RSS MB", ".0f")])
        for code, sched in result["demo_schedules"].items():
            for o in sched:
                print(f"  {code}: {o['schedule']}: {o['pair_s']:.3f} s per step of both twins, "
                      f"{o['steps_per_model_per_min']:.0f} steps per model per minute")
        print()
    if not args.gpu_only:
        print(f"CPU fp32, {args.threads} threads; each configuration in a fresh process")
        configs = [("tiny", args.tiny_batch, args.tiny_steps, 2)] if args.tiny_batch > 0 else []
        if args.small_batch > 0:
            configs.append(("small", args.small_batch, args.small_steps, 2))
        if args.paper_batch > 0:
            configs.append((args.paper_preset, args.paper_batch, args.paper_steps, 1))
        for preset, batch, steps, warmup in configs:
            for ref in ([False, True] if args.reference_paths else [False]):
                for src, malloc_defaults in variants:
                    result["cpu"].append(run_config(__file__, preset, batch, steps, warmup, args, reference_paths=ref,
                                                    src=src, malloc_defaults=malloc_defaults))
        print_table([r for r in result["cpu"] if "error" not in r], cols)
    if torch.cuda.is_available() and not args.cpu_only:
        for backend in ("sdpa", "flex"):
            result["cuda"].append(run_config(__file__, args.paper_preset, args.gpu_batch, args.gpu_steps, 3, args,
                                             device="cuda", backend=backend, compile=args.compile))
        print(f"\nCUDA bf16 autocast ({torch.cuda.get_device_name()}); ceiling = bf16 8192^3 matmul")
        print_table([r for r in result["cuda"] if "error" not in r],
                    cols[:-1] + [("mfu_h100_bf16", "MFU (H100 bf16)", ".1%"), ("peak_cuda_gb", "peak GB", ".1f")])
    elif not args.cpu_only:
        print("\nCUDA section skipped (no GPU)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
