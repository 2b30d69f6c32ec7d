"""The ``hieratok`` command. Sub-commands live in small functions; heavy imports happen inside them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Optional, Sequence

import yaml

__all__ = ["main", "parse_overrides"]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "scales=[1,4,16]", "downsample=interp"]`` -> dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .flops import model_info
    from .tokenizers import HieraTok

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = HieraTok.from_preset(args.preset, **parse_overrides(args.overrides))
    info = model_info(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p, f = info["params"], info["flops"]
    cfg = model.config
    print(f"{args.preset}: {cfg.image_size}x{cfg.image_size}, patch {cfg.patch_size}, latent {info['latent_shape']}, "
          f"scales {info['scales']}" + (f", downsample {info['downsample']}, attention {info['attention']}" if cfg.multiscale else ""))
    print(f"  params   encoder {p['encoder'] / 1e6:8.2f}M  downsampler {p['downsampler'] / 1e6:7.2f}M  "
          f"decoder {p['decoder'] / 1e6:8.2f}M  total {p['total'] / 1e6:8.2f}M")
    print(f"  GFLOPs   encoder {f['encoder'] / 1e9:8.2f}   downsampler {f['downsampler'] / 1e9:7.2f}   "
          f"decoder {f['decoder'] / 1e9:8.2f}   total {f['total'] / 1e9:8.2f}  (forward, one image)")
    print(f"  tokens   encoder {info['encoder_tokens']}  decoder {info['decoder_tokens']}  "
          f"(attention allows {info['attention_allowed_fraction']:.1%} of query-key pairs)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, load_config

    overrides = parse_overrides(args.overrides)
    for flag, key in ((args.preset, "preset"), (args.data, "data.path"), (args.out, "out_dir"), (args.steps, "steps")):
        if flag is not None:
            overrides[key] = flag
    if args.fsdp:
        overrides["fsdp"] = True
    cfg = load_config(args.config, overrides)
    Trainer(cfg).fit(resume=args.resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .presets import preset_names

    ap = argparse.ArgumentParser(prog="hieratok", description="Multi-scale visual tokenizers: train, evaluate, inspect.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameters, FLOPs and token counts of a preset")
    p.add_argument("preset", choices=preset_names())
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. scales=[1,4,16] downsample=interp")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("train", help="train a tokenizer (one CPU, or many GPUs under torchrun)",
                       description="Train HieraTok or its single-scale twin. Any config field can be set as "
                                   "key=value with dotted names, e.g. optim.lr=2e-4 loss.kl=1e-5 model.scales=[1,2,4,8].")
    p.add_argument("--preset", choices=preset_names(), default=None, help="model preset (default: tiny)")
    p.add_argument("--data", default=None, help="image folder, webdataset shards (path/glob/{000..009}), or none for the embedded photos")
    p.add_argument("--config", default=None, help="YAML file with TrainConfig fields")
    p.add_argument("--out", default=None, help="run directory (default runs/tokenizer)")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run) or a checkpoint directory")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP under torchrun")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=_cmd_train)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"hieratok {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
