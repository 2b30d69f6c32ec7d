"""Training-step throughput and peak memory of HieraTok.

    python benchmarks/bench_train_step.py                          # CPU: tiny (batch 8) + paper (batch 2, 1 step)
    python benchmarks/bench_train_step.py --json out/train.json
    python benchmarks/bench_train_step.py --gpu-only --gpu-batch 32 [--compile]   # on a CUDA machine

A step is what the trainer does in stage 1 without the perceptual network: forward in train mode
(posterior sampled, decoder drop-path 0.1), multi-scale L1 + MSE + KL loss
(:class:`hieratok.losses.reconstruction.MultiScaleReconstructionLoss`), backward, AdamW
(betas 0.9/0.95, weight decay 0.05). Every configuration runs in a fresh subprocess, so its
``ru_maxrss`` is the peak resident memory of that training run alone (model, gradients, AdamW
state, activations). Achieved GFLOP/s counts 3x the forward FLOPs of hieratok.flops.count_flops
per image (forward + backward, dense attention count); the ceiling is a large fp32 matmul measured
in the same process right after the steps.

CUDA section (only with a GPU): the paper preset with bf16 autocast, fused AdamW, sdpa and flex
attention backends (``--compile`` compiles the model first); images/s, model TFLOP/s, MFU against
the H100 dense bf16 peak (989 TFLOP/s), peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

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
    write_json,
)

from hieratok import HieraTok  # noqa: E402
from hieratok.flops import count_flops  # noqa: E402
from hieratok.losses.reconstruction import MultiScaleReconstructionLoss, ReconLossConfig  # noqa: E402


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (fresh) process: build, ``warmup`` + ``steps`` steps, report."""
    torch.set_num_threads(a.threads)
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
                            fused=dev.type == "cuda" or a.fused_adamw)
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
    samples = Samples()
    for _ in range(a.steps):
        time_once(step, dev, samples)
    out: dict[str, Any] = {"step_s": samples.seconds, "other_cpu": samples.other_cpu, "fwd_gflop_per_img": fwd_flops / 1e9,
                           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "peak_rss_mb": peak_rss_mb()}
    if dev.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["ceiling_gflops"] = statistics.median(matmul_gflops(8192, 10, dev, torch.bfloat16))
    else:
        del model, opt, net
        out["ceiling_gflops"] = statistics.median(matmul_gflops(3072, 5, dev))
    return out


def run_config(script: str, preset: str, batch: int, steps: int, warmup: int, args: argparse.Namespace,
               device: str = "cpu", backend: str = "sdpa", reference_paths: bool = False, compile: bool = False) -> dict[str, Any]:
    argv = ["--worker", "--preset", preset, "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
            "--threads", str(args.threads), "--device", device, "--backend", backend]
    argv += ["--reference-paths"] if reference_paths else []
    argv += ["--fused-adamw"] if args.fused_adamw else []
    argv += ["--compile"] if compile else []
    if device == "cpu" and args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    res = run_worker(script, argv)
    label = preset + (" (reference paths)" if reference_paths else "") + (" fused AdamW" if args.fused_adamw and device == "cpu" else "")
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
    if device == "cuda":
        row["mfu_h100_bf16"] = row["train_gflops"] / (H100_BF16_DENSE_TFLOPS * 1e3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-batch", type=int, default=8)
    ap.add_argument("--tiny-steps", type=int, default=10)
    ap.add_argument("--paper-preset", default="hieratok-f16d16")
    ap.add_argument("--paper-batch", type=int, default=2, help="CPU batch of the paper preset (0 skips it)")
    ap.add_argument("--paper-steps", type=int, default=2)
    ap.add_argument("--reference-paths", action="store_true", help="also run each CPU config with the fast paths off")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fused-adamw", action="store_true",
                    help="fused AdamW on CPU too (the trainer uses fused only on CUDA; fused is always on there)")
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--gpu-steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model in the CUDA section")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--cpu-only", action="store_true")
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
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "cpu": [], "cuda": []}
    cols = [("preset", "preset", "s"), ("device", "device", "s"), ("backend", "attn", "s"), ("batch", "batch", "d"),
            ("steps", "steps", "d"), ("s_per_step", "s/step (med)", ".3f"), ("s_per_step_min", "s/step (best)", ".3f"),
            ("img_per_s", "img/s", ".2f"), ("train_gflops", "GFLOP/s", ".0f"), ("ceiling_gflops", "ceiling", ".0f"),
            ("ceiling_ratio", "%ceil", ".1%"), ("peak_rss_mb", "peak RSS MB", ".0f")]
    if not args.gpu_only:
        print(f"CPU fp32, {args.threads} threads; each configuration in a fresh process")
        configs = [("tiny", args.tiny_batch, args.tiny_steps, 2)]
        if args.paper_batch > 0:
            configs.append((args.paper_preset, args.paper_batch, args.paper_steps, 1))
        for preset, batch, steps, warmup in configs:
            for ref in ([False, True] if args.reference_paths else [False]):
                result["cpu"].append(run_config(__file__, preset, batch, steps, warmup, args, reference_paths=ref))
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
