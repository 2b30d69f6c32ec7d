"""Decoder attention at the paper's shape: fast path vs reference path for every attention mode.

    python benchmarks/bench_attention.py                    # CPU, fp32, B=4, 341 tokens, 16 x 64 heads
    python benchmarks/bench_attention.py --json out/attn.json

For each mode (full, scale_causal, scale_independent) it times, forward only (inference mode) and
forward + backward:

- ``reference``: :func:`hieratok.nn.attention_reference` (explicit fp32 scores + softmax);
- ``sdpa-bool``: SDPA with the dense boolean mask, the reference path of the fast path;
- ``sdpa-float``: SDPA with the same mask as an additive float bias (0 / -inf);
- ``sdpa-segments``: the fast path, one unmasked SDPA call per scale segment
  (:class:`hieratok.nn.attention.SegmentedMask`); for ``full`` this is SDPA without a mask;
- on CUDA also ``flex``: compiled FlexAttention with the block-sparse mask.

q, k, v are views of one fused (B, L, 3, H, K) projection, as in the model. Times are ratios to
the unmasked full-attention call; ``allowed`` is the share of query-key pairs the mode allows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine_info, print_table, wait_for_quiet, write_json  # noqa: E402

from hieratok.nn import ATTENTION_MODES, MaskSpec  # noqa: E402
from hieratok.nn.attention import attention, attention_reference, resolve_mask  # noqa: E402


def variants(mode: str, scales: list[int], device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> fn(q, k, v) for one mode."""
    spec = MaskSpec.for_scales(mode, scales)
    m = spec.dense(device)
    seg = resolve_mask(spec, "sdpa", device)  # (85 masked + 256 unmasked queries; None for full)
    bias = torch.zeros(m.shape, device=device).masked_fill(~m, float("-inf"))
    out: dict[str, Callable[..., torch.Tensor]] = {
        "reference": lambda q, k, v: attention_reference(q, k, v, m),
        "sdpa-bool": lambda q, k, v: attention(q, k, v, m, "sdpa"),
        "sdpa-float": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)),
        "sdpa-segments": lambda q, k, v: attention(q, k, v, seg, "sdpa"),
    }
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask

        L = m.shape[0]
        bm = create_block_mask(spec.mask_mod(device), None, None, L, L, device=device)
        out["flex"] = lambda q, k, v: attention(q, k, v, bm, "flex")
    return out


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    L = sum(s * s for s in args.scales)
    qkv = torch.randn(args.batch, L, 3, args.heads, args.head_dim, generator=g, device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, K), strided like the model's
    qkv_g = qkv.detach().clone().requires_grad_(True)
    do = torch.randn(args.batch, args.heads, L, args.head_dim, generator=g, device=device, dtype=dtype)

    def fwd(fn: Callable) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return fn(q, k, v)
        return call

    def fwd_bwd(fn: Callable) -> Callable[[], Any]:
        def call() -> Any:
            qg, kg, vg = qkv_g.permute(2, 0, 3, 1, 4).unbind(0)
            fn(qg, kg, vg).backward(do)
            qkv_g.grad = None
        return call

    timed: dict[str, Callable[[], Any]] = {}
    errs: dict[tuple[str, str], float] = {}
    for mode in ATTENTION_MODES:  # every variant of every mode in one interleaved run
        fns = variants(mode, args.scales, device)
        with torch.inference_mode():
            ref = attention_reference(q.double(), k.double(), v.double(), MaskSpec.for_scales(mode, args.scales).dense(device))
            errs.update({(mode, n): (fn(q, k, v).double() - ref).abs().max().item() for n, fn in fns.items()})
        timed.update({f"{mode}|{n}|fwd": fwd(fn) for n, fn in fns.items()})
        if args.backward:
            timed.update({f"{mode}|{n}|fwd+bwd": fwd_bwd(fn) for n, fn in fns.items()})
    res = interleaved(timed, rounds=args.rounds, warmup=2, device=device)

    rows = []
    for (mode, n), err in errs.items():
        row: dict[str, Any] = {"mode": mode, "variant": n, "allowed": MaskSpec.for_scales(mode, args.scales).allowed_fraction(), "max_abs_err": err}
        for part in ("fwd", "fwd+bwd"):
            key = f"{mode}|{n}|{part}"
            if key in res:
                s = res[key].summary()
                row[f"{part}_ms_median"], row[f"{part}_ms_min"] = 1e3 * s["median"], 1e3 * s["min"]
                row[f"{part}_vs_full"] = s["min"] / min(res[f"full|sdpa-segments|{part}"].seconds)
                row[f"{part}_other_cpu"] = s["other_cpu_median"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-backward", dest="backward", action="store_false", help="time the forward pass only")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before measuring, wait up to this long for other processes to leave the CPUs idle")
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA section even if a GPU is present")
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "cpu": None, "cuda": None}
    cols = [("mode", "mode", "s"), ("variant", "variant", "s"), ("allowed", "allowed", ".3f"),
            ("fwd_ms_median", "fwd ms (med)", ".2f"), ("fwd_ms_min", "fwd ms (min)", ".2f"), ("fwd_vs_full", "fwd/full", ".2f"),
            ("fwd+bwd_ms_median", "f+b ms (med)", ".2f"), ("fwd+bwd_ms_min", "f+b ms (min)", ".2f"),
            ("fwd+bwd_vs_full", "f+b/full", ".2f"), ("max_abs_err", "max|err|", ".1e")]
    L = sum(s * s for s in args.scales)
    if not args.gpu_only:
        cpu_section(args, result, cols, L)
    if torch.cuda.is_available() and not args.cpu_only:
        print(f"\nCUDA bf16 ({torch.cuda.get_device_name()}): B={args.batch}, L={L}")
        result["cuda"] = run(args, torch.device("cuda"), torch.bfloat16)
        print_table(result["cuda"], cols)
    else:
        print("\nCUDA section skipped (no GPU)")
    write_json(args.json, result)


def cpu_section(args: argparse.Namespace, result: dict[str, Any], cols: list, L: int) -> None:
    print(f"CPU fp32, {args.threads} threads: B={args.batch}, L={L}, H={args.heads}, K={args.head_dim}; "
          f"ratios use the min times, /full = vs unmasked full attention")
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    result["cpu"] = run(args, torch.device("cpu"), torch.float32)
    print_table(result["cpu"], cols)


if __name__ == "__main__":
    main()
