"""HieraTok at other image sizes: time, memory and attention cost at the training size, 512 and 1024.

    python benchmarks/bench_anysize.py                                   # CPU: `small` (128 px model) at 128, 512, 1024
    python benchmarks/bench_anysize.py --preset hieratok-f16d16 --device cuda --sizes 256 512 1024   # GPU rows

Per size (square, a multiple of the patch): the token grid, the decoder's tokens L = sum h*w over
the scales (:func:`hieratok.tokenizers.hieratok.scale_shapes`), the query-key pairs the scale-causal
rule allows (``MaskSpec.allowed_fraction() * L^2``) and those the SDPA segments compute, the number
of segments (the mask keeps its structure at any grid: one block per scale, so the segment count
does not grow with the image), then one encode + decode (posterior mode, fp32 on CPU, bf16 autocast
on CUDA, random weights) timed after a warm-up, and the peak memory: ``ru_maxrss`` of a fresh
subprocess per size on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Growth: tokens grow with the pixel count (4x per doubled side), attention pairs with its square
(16x per doubled side), the MLP / projection FLOPs linearly (4x): at large sizes attention dominates.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

from hieratok import HieraTok  # noqa: E402
from hieratok.nn import MaskSpec  # noqa: E402


def structure(m: HieraTok, size: int) -> dict:
    c = m.config
    g = size // c.patch_size
    shapes = c.scale_shapes((g, g))
    spec = MaskSpec.for_scales(c.attention if c.multiscale else "full", shapes)
    L = spec.length
    segs = spec.segments()
    computed = sum((s.q1 - s.q0) * (s.k1 - s.k0) for s in segs)
    return {"size": size, "grid": g, "encoder_tokens": g * g, "decoder_tokens": L,
            "allowed_pairs": spec.allowed_fraction() * L * L, "computed_pairs": computed, "segments": len(segs)}


def measure(preset: str, size: int, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    m = HieraTok.from_preset(preset).eval().to(device)
    x = torch.rand(1, 3, size, size, device=device) * 2 - 1
    amp = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    with torch.inference_mode(), amp:
        for i in range(repeats + 1):  # the first is the warm-up
            t0 = time.perf_counter()
            m.decode(m.encode(x).mode())
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    out = {**structure(m, size), "seconds": min(times), "seconds_all": times}
    if device == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="sides in pixels (default: training size, 512, 1024)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker is not None:
        print(json.dumps(measure(a.preset, a.worker, a.device, a.repeats)))
        return
    sizes = a.sizes or [HieraTok.preset_config(a.preset).image_size, 512, 1024]
    rows = []
    for s in sizes:
        if a.device == "cpu":  # a fresh process per size: ru_maxrss is that size's peak
            r = subprocess.run([sys.executable, __file__, "--preset", a.preset, "--device", "cpu", "--threads",
                                str(a.threads), "--repeats", str(a.repeats), "--worker", str(s)],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        else:
            torch.cuda.reset_peak_memory_stats()
            rows.append(measure(a.preset, s, a.device, a.repeats))
    base = rows[0]
    print(f"{a.preset} on {a.device} ({machine_info().get('cpu', '')}, {a.threads} threads), batch 1, encode + decode")
    print("| size | grid | enc tokens | dec tokens | allowed pairs | computed pairs | segments | s/img | x time | peak MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['grid']} | {r['encoder_tokens']} | {r['decoder_tokens']} | {r['allowed_pairs']:.3g} | "
              f"{r['computed_pairs']:.3g} | {r['segments']} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.1f} | "
              f"{r['peak_mb']:.0f} |")
    if a.json:
        write_json(a.json, {"preset": a.preset, "device": a.device, "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
