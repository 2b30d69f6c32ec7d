"""Tokenizer inference speed and memory: HieraTok (paper presets) vs diffusers' AutoencoderKL (SD-VAE).

    python benchmarks/bench_tokenizer.py                                  # CPU, batch 4, 2 threads
    python benchmarks/bench_tokenizer.py --reference-paths --json out/tok.json
    python benchmarks/bench_tokenizer.py --gpu-only --gpu-batch 64        # on a CUDA machine

CPU section (fp32, ``torch.inference_mode``, random weights, random images in [-1, 1]):
encode (posterior mode) and decode (finest scale) are timed separately, interleaved over models
round by round together with a large fp32 matmul (the ceiling), after a warm-up round. Reported:
seconds per image (median, best), images/s, model GFLOPs per image (hieratok.flops.count_flops:
dense count, masked attention counted in full, as the paper does), achieved GFLOP/s = FLOPs x
images / time, its ratio to the ceiling measured in the same round, and images/s relative to
AutoencoderKL. ``--reference-paths`` adds the paper multi-scale model with the fast paths of
hieratok.nn switched off (dense masked SDPA, out-of-place GELU): the "before" of the fast paths.

Peak memory: each model runs once (build + one encode/decode at the benchmark batch) in a fresh
subprocess and reports ``ru_maxrss`` (resident-set high-water mark) and the RSS after building.

CUDA section (only when a GPU is present): bf16 autocast, sdpa and flex attention backends,
images/s, model TFLOP/s and MFU against the H100 dense bf16 peak (989 TFLOP/s), peak CUDA memory.

AutoencoderKL needs ``diffusers`` (``pip install --no-deps diffusers``); it is skipped without it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    H100_BF16_DENSE_TFLOPS,
    interleaved,
    machine_info,
    matmul_gflops,
    peak_rss_mb,
    print_table,
    rss_now_mb,
    run_worker,
    wait_for_quiet,
    write_json,
)

from hieratok import HieraTok  # noqa: E402
from hieratok.flops import count_flops  # noqa: E402

VAE = "sd-vae"
REF_SUFFIX = "+reference-paths"
DEFAULT_MODELS = ["hieratok-f16d16", "hieratok-f16d16-single", VAE]


def build_vae() -> torch.nn.Module:
    """diffusers AutoencoderKL at the Stable Diffusion VAE configuration, random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=256)


def set_fast_paths(model: HieraTok, enabled: bool) -> None:
    """Switch the fast paths of hieratok.nn (segmented masks, in-place GELU) on or off."""
    model.set_fast_paths(enabled)


class Coder:
    """encode / decode callables of one model, and its forward FLOPs per image."""

    def __init__(self, name: str, device: torch.device, backend: str = "sdpa", channels_last: bool = False) -> None:
        self.name = name
        if name == VAE:
            self.model = build_vae().to(device).eval()
            self.image_size = 256
            self.encode: Callable[[torch.Tensor], torch.Tensor] = lambda x: self.model.encode(x).latent_dist.mode()
            self.decode: Callable[[torch.Tensor], torch.Tensor] = lambda z: self.model.decode(z).sample
        else:
            preset = name.removesuffix(REF_SUFFIX)
            self.model = HieraTok.from_preset(preset, attn_backend=backend).to(device).eval()
            if name.endswith(REF_SUFFIX):
                set_fast_paths(self.model, False)
            self.image_size = self.model.config.image_size
            self.encode = lambda x: self.model.encode(x).mode()
            self.decode = lambda z: self.model.decode(z)
        self.device = device
        if channels_last:  # conv weights (and the VAE's activations) in NHWC, the layout oneDNN prefers
            self.model.to(memory_format=torch.channels_last)

    def flops_per_image(self) -> float:
        if isinstance(self.model, HieraTok):
            return count_flops(self.model)["total"]
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            self.decode(self.encode(x))
        return float(fc.get_total_flops())


def available(names: list[str]) -> list[str]:
    out = []
    for n in names:
        if n == VAE:
            try:
                import diffusers  # noqa: F401
            except ImportError:
                print("diffusers is not installed: skipping AutoencoderKL (pip install --no-deps diffusers)")
                continue
        out.append(n)
    return out


# ---- peak memory (fresh subprocess per model) ---------------------------------------------------
def memory_worker(name: str, batch: int, threads: int, channels_last: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    coder = Coder(name, torch.device("cpu"), channels_last=channels_last)
    rss_model = rss_now_mb()
    x = torch.rand(batch, 3, coder.image_size, coder.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        coder.decode(coder.encode(x))
    return {"rss_after_build_mb": rss_model, "peak_rss_mb": peak_rss_mb()}


# ---- CPU timing ---------------------------------------------------------------------------------
def cpu_section(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    dev = torch.device("cpu")
    coders = {n: Coder(n, dev, channels_last=args.channels_last) for n in names}
    flops = {n: c.flops_per_image() for n, c in coders.items()}
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.rand(args.batch, 3, c.image_size, c.image_size, generator=g) * 2 - 1 for n, c in coders.items()}
    with torch.inference_mode():
        z = {n: c.encode(xs[n]) for n, c in coders.items()}
    n_mm = args.ceiling_size
    a, b = torch.randn(n_mm, n_mm, generator=g), torch.randn(n_mm, n_mm, generator=g)

    fns: dict[str, Callable[[], Any]] = {"ceiling": lambda: a @ b}
    for n, c in coders.items():
        fns[f"{n}|encode"] = (lambda c=c, n=n: c.encode(xs[n]))
        fns[f"{n}|decode"] = (lambda c=c, n=n: c.decode(z[n]))
    with torch.inference_mode():
        res = interleaved(fns, rounds=args.rounds, warmup=1, log=args.verbose)

    B = args.batch
    ceil = [2 * n_mm ** 3 / t / 1e9 for t in res["ceiling"].seconds]  # GFLOP/s per round
    ceil_quiet = [c for c, o in zip(ceil, res["ceiling"].other_cpu) if o is not None and o < args.quiet]
    ceiling = {"median": statistics.median(ceil), "best": max(ceil),
               "quiet": statistics.median(ceil_quiet) if ceil_quiet else None, "rounds": ceil}
    rows = []
    for n in names:
        enc, dec = res[f"{n}|encode"].summary(args.quiet), res[f"{n}|decode"].summary(args.quiet)
        tot_r = [e + d for e, d in zip(res[f"{n}|encode"].seconds, res[f"{n}|decode"].seconds)]  # per batch
        ratio_r = [flops[n] * B / t / 1e9 / c for t, c in zip(tot_r, ceil)]
        best = enc["min"] + dec["min"]
        quiet = enc["quiet_median"] + dec["quiet_median"] if enc["n_quiet"] and dec["n_quiet"] else None
        row = {
            "model": n, "batch": B, "gflop_per_img": flops[n] / 1e9,
            "encode_s_per_img_best": enc["min"] / B, "decode_s_per_img_best": dec["min"] / B,
            "s_per_img_best": best / B, "s_per_img_median": statistics.median(tot_r) / B,
            "s_per_img_quiet": None if quiet is None else quiet / B,
            "gflops_best": flops[n] * B / best / 1e9,
            "ceiling_ratio_best": flops[n] * B / best / 1e9 / ceiling["best"],
            "ceiling_ratio_median": statistics.median(ratio_r),
            "ceiling_ratio_quiet": None if quiet is None or ceiling["quiet"] is None else flops[n] * B / quiet / 1e9 / ceiling["quiet"],
            "n_quiet": {"encode": enc["n_quiet"], "decode": dec["n_quiet"]},
            "samples": {"encode_s": res[f"{n}|encode"].seconds, "decode_s": res[f"{n}|decode"].seconds,
                        "encode_other_cpu": res[f"{n}|encode"].other_cpu, "decode_other_cpu": res[f"{n}|decode"].other_cpu},
        }
        rows.append(row)
    vae = next((r for r in rows if r["model"] == VAE), None)
    for row in rows:
        row["img_per_s_best"] = 1.0 / row["s_per_img_best"]
        for k in ("best", "median", "quiet"):
            v, ref = row[f"s_per_img_{k}"], None if vae is None else vae[f"s_per_img_{k}"]
            row[f"x_vae_{k}"] = None if v is None or ref is None else ref / v  # images/s ratio
    return {"rows": rows, "ceiling_gflops": ceiling, "ceiling_matmul": f"fp32 ({n_mm} x {n_mm}) @ ({n_mm} x {n_mm})",
            "ceiling_other_cpu": res["ceiling"].other_cpu}


# ---- CUDA timing --------------------------------------------------------------------------------
def cuda_section(args: argparse.Namespace, names: list[str]) -> Optional[dict[str, Any]]:
    dev = torch.device("cuda")
    rows = []
    ceil = statistics.median(matmul_gflops(8192, 10, dev, torch.bfloat16)) / 1e3
    for name in names:
        for backend in (["sdpa", "flex"] if name != VAE and not name.endswith(REF_SUFFIX) else ["sdpa"]):
            coder = Coder(name, dev, backend)
            flops = coder.flops_per_image()
            x = torch.rand(args.gpu_batch, 3, coder.image_size, coder.image_size, device=dev) * 2 - 1
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                zz = coder.encode(x)
                res = interleaved({"encode": lambda: coder.encode(x), "decode": lambda: coder.decode(zz)},
                                  rounds=args.rounds, warmup=2, device=dev)
            tot = [e + d for e, d in zip(res["encode"].seconds, res["decode"].seconds)]
            ips = args.gpu_batch / statistics.median(tot)
            rows.append({"model": name, "backend": backend, "batch": args.gpu_batch, "img_per_s": ips,
                         "ms_per_img": 1e3 / ips, "tflops": flops * ips / 1e12,
                         "mfu_h100_bf16": flops * ips / (H100_BF16_DENSE_TFLOPS * 1e12),
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30})
            coder = x = zz = None  # free the model before the next one
            torch.cuda.empty_cache()
    return {"rows": rows, "bf16_matmul_tflops": ceil, "device": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help=f"presets and/or {VAE!r} (AutoencoderKL); default: %(default)s")
    ap.add_argument("--reference-paths", action="store_true",
                    help="also time hieratok-f16d16 with the hieratok.nn fast paths switched off")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true",
                    help="put every model's conv weights in channels-last layout (HieraTok's conv downsampler, the VAE)")
    ap.add_argument("--ceiling-size", type=int, default=3072, help="side of the square fp32 matmul ceiling")
    ap.add_argument("--quiet", type=float, default=0.1,
                    help="a round is quiet when other processes used less than this share of the CPUs")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-RSS subprocesses")
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before measuring, wait up to this long for other processes to leave the CPUs idle")
    ap.add_argument("--verbose", action="store_true", help="print every timing round")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.memory_worker:  # fresh-process peak memory of one model; last stdout line is JSON
        import json

        print(json.dumps(memory_worker(args.memory_worker, args.batch, args.threads, args.channels_last)))
        return

    torch.set_num_threads(args.threads)
    names = available(args.models)
    if args.reference_paths and "hieratok-f16d16" + REF_SUFFIX not in names:
        names.insert(1, "hieratok-f16d16" + REF_SUFFIX)
    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "cpu": None, "cuda": None}

    if not args.gpu_only:
        print(f"CPU fp32, {args.threads} threads, batch {args.batch}, {args.rounds} interleaved rounds")
        mem = {}
        if args.memory:
            for n in names:
                mem[n] = run_worker(__file__, ["--memory-worker", n, "--batch", str(args.batch), "--threads", str(args.threads)]
                                    + (["--channels-last"] if args.channels_last else []))
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        cpu = cpu_section(args, names)
        for row in cpu["rows"]:
            row.update({k: v for k, v in mem.get(row["model"], {}).items() if k != "error"})
        result["cpu"] = cpu
        c = cpu["ceiling_gflops"]
        q = "-" if c["quiet"] is None else f"{c['quiet']:.0f}"
        print(f"ceiling {cpu['ceiling_matmul']}: best {c['best']:.0f} GFLOP/s, median {c['median']:.0f}, quiet {q}; "
              "others' CPU share during the ceiling samples: " + ", ".join(f"{o:.0%}" for o in cpu["ceiling_other_cpu"] if o is not None))
        print("best = fastest encode + fastest decode (vs the best ceiling); quiet = median over samples during which "
              f"other processes used < {args.quiet:.0%} of the CPUs; med = median of rounds (any load)")
        print_table(cpu["rows"], [
            ("model", "model", "s"), ("encode_s_per_img_best", "enc s/img", ".3f"), ("decode_s_per_img_best", "dec s/img", ".3f"),
            ("s_per_img_best", "s/img best", ".3f"), ("s_per_img_quiet", "quiet", ".3f"), ("s_per_img_median", "med", ".3f"),
            ("img_per_s_best", "img/s best", ".2f"), ("gflop_per_img", "GFLOP/img", ".1f"), ("gflops_best", "GFLOP/s best", ".0f"),
            ("ceiling_ratio_best", "%ceil best", ".1%"), ("ceiling_ratio_quiet", "quiet", ".1%"), ("ceiling_ratio_median", "med", ".1%"),
            ("x_vae_best", "x VAE best", ".2f"), ("x_vae_quiet", "quiet", ".2f"), ("x_vae_median", "med", ".2f"),
            ("rss_after_build_mb", "RSS model MB", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f")])
        for n, m in mem.items():
            if "error" in m:
                print(f"memory worker for {n} failed: {m['error']}")

    if torch.cuda.is_available() and not args.cpu_only:
        cuda = cuda_section(args, names)
        result["cuda"] = cuda
        print(f"\nCUDA bf16 autocast on {cuda['device']}, batch {args.gpu_batch}; bf16 matmul {cuda['bf16_matmul_tflops']:.0f} TFLOP/s")
        print_table(cuda["rows"], [("model", "model", "s"), ("backend", "backend", "s"), ("img_per_s", "img/s", ".1f"),
                                   ("ms_per_img", "ms/img", ".2f"), ("tflops", "TFLOP/s", ".1f"),
                                   ("mfu_h100_bf16", "MFU (H100 bf16)", ".1%"), ("peak_mem_gb", "peak GB", ".1f")])
    elif not args.cpu_only:
        print("\nCUDA section skipped (no GPU)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
