"""The ``hieratok`` command. Sub-commands live in small functions; heavy imports happen inside them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ._optional import MissingExtraError
from .version import __version__

# Commands whose whole process runs models batch after batch: they keep freed tensor memory in the
# process (machine.keep_freed_memory) instead of faulting fresh pages for every batch's
# activations. `train` (and `demo` / `ablate` through it) follows TrainConfig.keep_freed_memory.
KEEP_FREED_MEMORY = ("reconstruct", "eval", "cache-latents", "sample")

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


def _all_presets() -> dict[str, str]:
    """Preset name -> model_type, over every registered family."""
    from .registry import MODEL_TYPES, model_class

    return {name: kind for kind in MODEL_TYPES for name in model_class(kind).preset_names()}


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .config import config_to_dict
    from .flops import model_info
    from .registry import model_class

    kind = _all_presets()[args.preset]
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = model_class(kind).from_preset(args.preset, **parse_overrides(args.overrides))
    if kind != "hieratok":  # parameters by part and the config
        parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
        total = sum(p.numel() for p in model.parameters())
        if args.json:
            print(json.dumps({"model_type": kind, "params": {**parts, "total": total},
                              "config": config_to_dict(model.config)}, indent=2, default=str))
            return 0
        print(f"{args.preset} ({kind}): {total / 1e6:.2f}M parameters")
        print("  " + "  ".join(f"{name} {n / 1e6:.2f}M" for name, n in parts.items() if n))
        return 0
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
    if cfg.multiscale:
        print(f"           downsampler share {info['downsampler_share']:.1%} of all, "
              f"{p['downsampler'] / p['decoder']:.1%} of the decoder (paper f16d16: 13.2%, 17.4%)")
    print(f"  GFLOPs   encoder {f['encoder'] / 1e9:8.2f}   downsampler {f['downsampler'] / 1e9:7.2f}   "
          f"decoder {f['decoder'] / 1e9:8.2f}   total {f['total'] / 1e9:8.2f}  (forward, one image)")
    print(f"  tokens   encoder {info['encoder_tokens']}  decoder {info['decoder_tokens']}  "
          f"(attention allows {info['attention_allowed_fraction']:.1%} of query-key pairs)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import NonFiniteLossError, Trainer, load_config
    from .train.trainer import check_run_dir

    overrides = parse_overrides(args.overrides)
    for flag, key in ((args.task, "task"), (args.preset, "preset"), (args.data, "data.path"), (args.out, "out_dir"),
                      (args.steps, "steps")):
        if flag is not None:
            overrides[key] = flag
    if args.fsdp:
        overrides["fsdp"] = True
    cfg = load_config(args.config, overrides)
    check_run_dir(cfg.out_dir, args.resume, args.overwrite)  # before any network is built
    try:
        Trainer(cfg, allow_code_execution=args.allow_code_execution, overwrite=args.overwrite).fit(resume=args.resume)
    except NonFiniteLossError as e:  # a training outcome, not a bug: one line, no traceback
        print(f"hieratok train: error: {e}", file=sys.stderr)
        return 3
    return 0


def _device(name: Optional[str]) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _init_eval_dist() -> None:
    """Join the process group when launched by torchrun (evaluation shards the data over ranks)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .train.parallel import init_distributed

        init_distributed()


def _cmd_eval_recon(args: argparse.Namespace) -> int:
    from .evaluate import ReconEvalConfig, evaluate_reconstruction
    from .evaluate.recon import write_recon_report
    from .registry import TOKENIZERS, load_model

    _init_eval_dist()
    dev = _device(args.device)
    model, info = load_model(args.checkpoint, ema=not args.no_ema, device=dev, expect=TOKENIZERS)
    cfg = ReconEvalConfig(data=args.data, num=args.num, batch_size=args.batch_size, perceptual=args.perceptual,
                          fid=not args.no_fid, kid=args.kid, inception_weights=args.inception_weights,
                          num_workers=args.workers, precision=args.precision, image_size=args.image_size)
    res = evaluate_reconstruction(model, cfg, dev)
    out = Path(args.out or Path(info["model_dir"]) / "eval")
    from .evaluate.recon import _world

    if _world()[0] == 0:
        report = write_recon_report(res, out, f"Reconstruction: {args.checkpoint}", info)
        keys = [k for k in ("rfid", "rkid", "psnr", "ssim", res.get("perceptual_name"), "color_error") if k in res]
        print("  ".join(f"{k} {res[k]:.4f}" for k in keys) + f"  ({res['num_images']} images)")
        if len(res["psnr_per_scale"]) > 1:
            print("PSNR per scale: " + "  ".join(f"{s}px {v:.2f}" for s, v in res["psnr_per_scale"].items()))
        if "codebook_usage" in res:
            print(f"codebook usage {res['codebook_usage']:.1%}  entropy H_C {res['codebook_entropy_bits']:.3f} bits  "
                  f"perplexity {res['codebook_perplexity']:.1f}")
        print(f"report: {report}")
    return 0


def _cmd_eval_latents(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_latents
    from .registry import DIFFUSERS_VAE, load_model

    dev = _device(args.device)
    model, info = load_model(args.checkpoint, ema=not args.no_ema, device=dev, expect=("hieratok", DIFFUSERS_VAE))
    out = Path(args.out or Path(info["model_dir"]) / "eval")
    res = evaluate_latents(model, args.data, protocol=args.protocol, flip=args.flip, train_stats=args.train_stats,
                           train_data=args.train_data, num_train_images=args.num_train_images,
                           num_images=args.num_images, num_points=args.num_points, num_runs=args.runs, seed=args.seed,
                           iterations=args.iterations, device=dev, out_dir=out, precision=args.precision)
    print(f"density CV {res['density_cv']:.3f} +- {res['density_cv_std']:.3f}  Gini {res['gini']:.3f} +- "
          f"{res['gini_std']:.3f}  normalized entropy {res['normalized_entropy']:.4f} +- {res['normalized_entropy_std']:.4f}"
          f"  ({res['num_points']} points, {res['num_runs']} runs)")
    print(f"protocol {res['protocol']}, flips {'on' if res['flip'] else 'off'}, normalised by the "
          + ("evaluated set's own statistics (no --train-stats / --train-data)" if res["normalization"] == "eval-set"
             else f"training statistics of {res['train_stats_source']}"))
    print(f"t-SNE plot: {res['tsne_png']}")
    return 0


def _cmd_eval_fid(args: argparse.Namespace) -> int:
    from .metrics import fid_from_sources

    res = fid_from_sources(args.a, args.b, weights=args.inception_weights, device=_device(args.device),
                           batch_size=args.batch_size, save_stats=(args.save_stats_a, args.save_stats_b))
    d = res.as_dict()
    print(json.dumps(d, indent=2) if args.json else f"FID {d['fid']:.4f}  ({d['num_a']} vs {d['num_b']} images; "
                                                    f"Inception weights: {d['inception_source']})")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .evaluate import compare_runs

    if args.curves:  # training curves of the runs, overlaid (e.g. two DiTs on two tokenizers' latents)
        from .report import plot_loss_curves

        names = args.names or [Path(r).name for r in args.runs]
        csvs = {n: Path(r) / "metrics.csv" for n, r in zip(names, args.runs)}
        missing = [str(p) for p in csvs.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no training log {missing[0]}")
        print(f"curves: {plot_loss_curves(csvs, args.curves, keys=args.keys, log_y=True)}")
        return 0
    table = compare_runs(args.runs, args.names, baseline=args.baseline)
    print(table.to_markdown() if args.markdown else table.to_text())
    return 0


def _print_ablation(res: dict[str, Any]) -> None:
    import resource

    from .ablation import conclusions

    t1, t2 = res["tables"]
    print()
    print(t1.to_text())
    print()
    print(t2.to_text())
    print()
    for line in conclusions(res["summary"], res["baseline"]):
        print(line)
    # the largest process: this one, or a run process (ru_maxrss of the children is their largest)
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2**20
    print(f"\n{res['steps']} steps per run, {res['seeds_done']} of {res['seeds_asked']} seeds, "
          f"{res.get('workers', 1)} process(es) x {res['threads']} thread(s), "
          f"{res['seconds'] / 60:.1f} min, peak memory {peak:.2f} GiB per process")
    print(f"report: {res['report']}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(minutes=args.minutes, steps=args.steps, seeds=args.seeds, preset=args.preset, data=args.data,
                     out=args.out, threads=args.threads, workers=args.workers, replan_factor=args.replan_factor,
                     overwrite=args.overwrite, resume=args.resume)
    res = run_demo(cfg)
    res["baseline"] = "single"
    _print_ablation(res)
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from .ablation import AblationConfig, run_ablation, summary_tables, write_report

    cfg = AblationConfig(preset=args.preset, variants=tuple(args.variants), baseline=args.baseline, seeds=args.seeds,
                         minutes=args.minutes, steps=args.steps, data=args.data, eval_data=args.eval_data,
                         out=args.out, batch_size=args.batch_size, eval_crops_per_photo=args.eval_crops,
                         threads=args.threads, workers=args.workers, replan_factor=args.replan_factor,
                         overwrite=args.overwrite, resume=args.resume)
    res = run_ablation(cfg)
    intro = (f"Variants of {args.preset}, each trained for {res['steps']} steps of {cfg.batch_size} images with "
             f"{res['seeds_done']} seed(s) (seed k: the same data order and encoder initialisation for every variant), "
             f"evaluated on held-out images; differences to {cfg.baseline} are paired by seed.")
    res["report"] = write_report(res, cfg, f"HieraTok ablation ({args.preset})", intro)
    res["tables"], res["baseline"] = summary_tables(res["summary"], cfg.baseline), cfg.baseline
    _print_ablation(res)
    return 0


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from .registry import load_model
    from .workflows.reconstruct import reconstruct_files

    model, _ = load_model(args.checkpoint, ema=not args.no_ema, device=_device(args.device), expect=("hieratok",))
    for f in reconstruct_files(model, args.images, args.out, args.mode, overwrite=args.overwrite, tile=args.tile,
                               overlap=args.overlap):
        print(f)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .workflows.generation import cache_latents

    _init_eval_dist()
    meta = cache_latents(args.checkpoint, args.data, args.out, flip=args.flip, ten_crop=args.ten_crop,
                         crop_range=args.crop_range, num=args.num, batch_size=args.batch_size,
                         shard_size=args.shard_size, device=_device(args.device), num_workers=args.workers,
                         precision=args.precision, update_tokenizer=args.update_tokenizer)
    if meta:
        print(f"{meta['num']} {meta['kind']} of shape {meta['shape']} ({meta['num_labels']} labels) in {args.out}")
        if args.update_tokenizer:
            print(f"latent mean/std written into {meta['tokenizer']}/config.json")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .workflows.generation import sample_to_folder

    _init_eval_dist()
    npz = sample_to_folder(args.generator, args.out, tokenizer=args.tokenizer, num=args.num, cfg_scale=args.cfg,
                           seed=args.seed, batch_size=args.batch_size, steps=args.steps, all_scales=args.all_scales,
                           device=_device(args.device), top_p=args.top_p, top_k=args.top_k,
                           temperature=args.temperature, cfg_schedule=args.cfg_schedule, precision=args.precision)
    print(f"samples: {Path(args.out) / 'images'}  npz: {npz}")
    return 0


def _cmd_eval_gen(args: argparse.Namespace) -> int:
    from .workflows.generation import evaluate_generation

    res = evaluate_generation(args.samples, args.ref, out=args.out, inception_weights=args.inception_weights,
                              device=_device(args.device), batch_size=args.batch_size,
                              precision_and_recall=not args.no_pr, save_stats=args.save_stats)
    names = (("is", "IS", ".2f"), ("gfid", "gFID", ".3f"), ("sfid", "sFID", ".3f"), ("precision", "precision", ".4f"),
             ("recall", "recall", ".4f"))
    print("  ".join(f"{name} {res[k]:{fmt}}" for k, name, fmt in names if k in res)
          + f"  ({res['num_samples']} samples; Inception weights: {res['inception_source']})")
    for k, what in (("is_unavailable", ""), ("sfid_unavailable", "sFID unavailable: "),
                    ("precision_recall_unavailable", "precision / recall unavailable: ")):
        if k in res:
            print(what + res[k])  # the IS message names itself and the missing file
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.which == "restok":
        from .convert import load_official_restok

        model = load_official_restok(args.path, **parse_overrides(args.overrides))
    else:
        from .convert import load_llamagen_gpt

        model = load_llamagen_gpt(args.path, **parse_overrides(args.overrides))
    out = model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.path} -> {out} ({type(model).__name__}, {n / 1e6:.1f}M parameters)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .registry import load_model

    model, info = load_model(args.checkpoint, ema=not args.no_ema)
    commit = model.push_to_hub(args.repo_id, source_dir=info["model_dir"], subfolder=args.subfolder,
                               private=args.private or None, revision=args.revision, token=args.token,
                               commit_message=args.message)
    print(f"pushed {info['model_type']} ({info['weights']} weights) from {info['model_dir']} to {args.repo_id}: "
          f"{getattr(commit, 'commit_url', commit)}")
    return 0


def _precision_option(p: argparse.ArgumentParser) -> None:
    from .precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the model's arithmetic: fp32, tf32 (CUDA tensor cores), bf16 or fp16 autocast (default: tf32 "
                        "on CUDA, fp32 on CPU); Inception and the perceptual networks always run in fp32")


def _ablation_options(p: argparse.ArgumentParser, seeds: int) -> None:
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds per variant (default {seeds})")
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once, each in its own process (default: one per core, at most 4; "
                        "1: one after the other in this process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each run (default: cores / workers; with one worker the faster of 1 "
                        "and all cores, timed at the start)")
    from .ablation import AblationConfig

    factor = AblationConfig.replan_factor
    p.add_argument("--no-replan", dest="replan_factor", action="store_const", const=None, default=factor,
                   help=f"keep the steps calibrated at the start even when the first runs time their steps more than "
                        f"{factor}x slower or faster (default: plan again once, from the measured speed)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the runs in --out (same settings)")
    g.add_argument("--overwrite", action="store_true", help="replace what --out holds")


def build_parser() -> argparse.ArgumentParser:
    from .tokenizers import HieraTok

    ap = argparse.ArgumentParser(prog="hieratok", description="Multi-scale visual tokenizers: train, evaluate, inspect.")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    ap.add_argument("--version", action="version", version=f"hieratok {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameters (HieraTok: also FLOPs and token counts) of any family's preset")
    p.add_argument("preset", choices=sorted(_all_presets()))
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. scales=[1,4,16] downsample=interp")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="train the tiny multi-scale HieraTok and its single-scale twin side by side, "
                                    "evaluate both on held-out photos, write a report (about 10 minutes on 2 CPU cores)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget for the whole demo (default 10)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps per model instead")
    p.add_argument("--preset", default="tiny", choices=[n for n in HieraTok.preset_names() if not n.endswith("-single")],
                   help="multi-scale preset; its twin is <preset>-single")
    p.add_argument("--data", default=None, help="training images (default: the embedded photos)")
    p.add_argument("--out", default="runs/demo")
    _ablation_options(p, seeds=3)
    p.set_defaults(func=_cmd_demo)

    from .ablation import VARIANTS

    p = sub.add_parser("ablate", help="train variants of a preset with several seeds, compare them with mean +- std "
                                      "and paired differences (the paper's Tables 2-4 in miniature)")
    p.add_argument("--preset", default="tiny", choices=[n for n in HieraTok.preset_names() if not n.endswith("-single")])
    p.add_argument("--variants", nargs="+", default=["single", "conv", "conv-residual", "conv-prenorm", "interp",
                                                     "full", "independent", "fewer-scales", "pixels"],
                   help=f"names ({', '.join(VARIANTS)}) or name:key=value,... (training-config overrides)")
    p.add_argument("--baseline", default="single")
    p.add_argument("--minutes", type=float, default=60.0, help="time budget (default 60)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps per run instead")
    p.add_argument("--data", default=None, help="training images (default: the embedded photos)")
    p.add_argument("--eval-data", default=None, help="held-out images (default: the embedded held-out photos)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-crops", type=int, default=64, help="crops per embedded held-out photo (default 64)")
    p.add_argument("--out", default="runs/ablate")
    _ablation_options(p, seeds=3)
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("reconstruct", help="reconstruct your own images and write their per-scale pyramids")
    p.add_argument("images", nargs="+")
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint or model folder")
    p.add_argument("--mode", choices=["crop", "full", "tile", "auto"], default="crop",
                   help="crop: ADM centre crop to the model size; full: the whole image at once, own size and "
                        "aspect; tile: the whole image in overlapping tiles blended without seams; auto: full up "
                        "to 16 model-size images of pixels, tile above")
    p.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: the model's image size)")
    p.add_argument("--overlap", type=int, default=None, help="tile blending width in pixels (default: tile / 4)")
    p.add_argument("--out", default=None, help="output folder (default: next to each image)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs written before")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("train", help="train a tokenizer (one CPU, or many GPUs under torchrun)",
                       description="Train HieraTok or its single-scale twin. Any config field can be set as "
                                   "key=value with dotted names, e.g. optim.lr=2e-4 loss.kl=1e-5 model.scales=[1,2,4,8].")
    p.add_argument("--task", choices=["hieratok", "restok", "dit", "ar", "tokenizer"], default=None,
                   help="hieratok (HieraTok, default; 'tokenizer' is its old name), restok (ResTok), dit (on a "
                        "latent cache) or ar (HAR / next-token GPT on a code cache)")
    p.add_argument("--preset", default=None, help="model preset: tokenizer (tiny, hieratok-f16d16, ...), restok (restok-tiny, restok-l-128), "
                                                  "DiT (dit-tiny ... dit-xl) or GPT (gpt-tiny, gpt-b, gpt-l)")
    p.add_argument("--data", default=None, help="image folder, webdataset shards (path/glob/{000..009}), or none for the embedded photos")
    p.add_argument("--config", default=None, help="YAML file with TrainConfig fields")
    p.add_argument("--out", default=None, help="run directory (default runs/tokenizer)")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run) or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out (its log, config, "
                                                            "checkpoints); without it such a folder is refused")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="accept inputs that run code while loading: torch.export (.pt2) frozen encoders and webdataset "
                        "'pipe:' data specs (a config file cannot enable this)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP under torchrun")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate: recon, latents, fid, gen").add_subparsers(dest="what", required=True)
    p = ev.add_parser("recon", help="rFID, PSNR, SSIM, perceptual distance and per-scale PSNR of a tokenizer")
    p.add_argument("--checkpoint", required=True, help="run folder (latest checkpoint), checkpoint or model folder, "
                                                       "or diffusers:DIR (an AutoencoderKL folder)")
    p.add_argument("--data", default=None, help="evaluation images (folder or shards); default: the embedded held-out photos")
    p.add_argument("--num", type=int, default=50_000, help="number of images (default 50000, the paper protocol)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--perceptual", default="auto", choices=["auto", "lpips-vgg", "effnet-lite0", "none"])
    p.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception network)")
    p.add_argument("--kid", action="store_true", help="also rKID (unbiased on few images; one process)")
    p.add_argument("--inception-weights", default=None, help="FID Inception weight file (default: hub cache, then the offline trunk)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="output folder (default <checkpoint>/eval)")
    _precision_option(p)
    p.add_argument("--image-size", type=int, default=None,
                   help="evaluate at this side instead of the training size (e.g. 512 for a 256 model; a multiple "
                        "of the patch size), positions resampled")
    p.set_defaults(func=_cmd_eval_recon)

    p = ev.add_parser("latents", help="latent uniformity (t-SNE density CV, Gini, normalized entropy) and a t-SNE plot")
    p.add_argument("--checkpoint", required=True, help="HieraTok run, checkpoint or model folder, or diffusers:DIR")
    p.add_argument("--data", default=None)
    p.add_argument("--protocol", choices=["vavae", "pooled"], default="vavae",
                   help="vavae (default, Table 5): one random latent position per image, as VA-VAE's analysis; "
                        "pooled: positions pooled over images (this package's earlier protocol)")
    p.add_argument("--train-stats", default=None, metavar="PATH",
                   help="training-set latent mean/std to normalise with: a latent cache folder or its cache.json, "
                        "an .npz with mean/std, or VA-VAE's latents_stats.pt (default: the evaluated set's own)")
    p.add_argument("--train-data", default=None,
                   help="training images to encode for the normalisation statistics instead of --train-stats")
    p.add_argument("--num-train-images", type=int, default=10_000, help="images of --train-data to encode")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="vavae: each image drawn as itself or, with probability 1/2, its mirrored copy "
                        "(default: on for vavae, off for pooled)")
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--num-points", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    _precision_option(p)
    p.set_defaults(func=_cmd_eval_latents)

    p = ev.add_parser("fid", help="FID between two image folders / image .npz / statistics .npz")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--save-stats-a", default=None, help="write the statistics of A (npz with mu, sigma)")
    p.add_argument("--save-stats-b", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval_fid)

    p = ev.add_parser("gen", help="the ADM evaluator's IS (when the Inception classifier weights exist), gFID, sFID, "
                                  "precision and recall of generated samples, from one Inception pass")
    p.add_argument("samples", help="folder of PNGs or ADM-format .npz (arr_0 uint8 NHWC)")
    p.add_argument("--ref", required=True, help="reference: statistics .npz (mu, sigma; e.g. VIRTUAL_imagenet256_labeled.npz), "
                                                "images .npz or folder")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None)
    p.add_argument("--no-pr", action="store_true",
                   help="skip precision / recall (they need the reference images: one more Inception pass over them)")
    p.add_argument("--save-stats", default=None, metavar="NPZ",
                   help="write the samples' statistics in ADM's layout (mu, sigma, mu_s, sigma_s)")
    p.add_argument("--out", default=None, help="where gen_metrics.json goes (default: beside the samples)")
    p.set_defaults(func=_cmd_eval_gen)

    p = sub.add_parser("cache-latents", help="encode a dataset once with a tokenizer (latents or codes) for generator training")
    p.add_argument("--checkpoint", required=True, help="tokenizer: run, checkpoint or model folder (HieraTok or ResTok), "
                                                       "or diffusers:DIR (an AutoencoderKL folder)")
    p.add_argument("--data", default=None, help="image folder (ADM centre crop; class folders give labels); default: embedded photos")
    p.add_argument("--out", required=True)
    views = p.add_mutually_exclusive_group()
    views.add_argument("--flip", action="store_true", help="also cache the horizontally flipped copy of every image")
    views.add_argument("--ten-crop", action="store_true",
                       help="LlamaGen / ResTok code extraction: ten TenCrop views per image (one drawn per access)")
    p.add_argument("--crop-range", type=float, default=1.1, help="with --ten-crop: centre crop of crop-range x size first")
    p.add_argument("--num", type=int, default=None, help="at most this many images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    _precision_option(p)
    p.add_argument("--update-tokenizer", action="store_true",
                   help="also write the latents' per-channel mean/std into the HieraTok folder's config.json "
                        "(latent_mean, latent_std: the scaling diffusers interop reads)")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("sample", help="generate images with a trained DiT / GPT: PNGs + ADM-format samples.npz")
    p.add_argument("--generator", required=True, help="generator run, checkpoint or model folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer that decodes the samples (default: the cache's)")
    p.add_argument("--num", type=int, default=50_000)
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none, the paper's gFID)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (DiT; default 250 diffusion / 50 flow)")
    p.add_argument("--all-scales", action="store_true", help="also write every sample's multi-scale pyramid (HieraTok)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--cfg-schedule", choices=["constant", "step", "step-release", "step-release-tokens"], default=None,
                   help="guidance per pass: constant, step (guided from 25%% of the passes on), step-release "
                        "(the ResTok release's step schedule as its published sampling script runs it: like "
                        "step, with 1.0001 on the unguided passes) or step-release-tokens (the release's "
                        "token-counter path, not used by its published script)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    _precision_option(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("convert", help="convert the official ResTok / HAR-GPT release files into hieratok model folders")
    p.add_argument("which", choices=["restok", "har"], help="restok: the tokenizer; har: its LlamaGen HAR generator")
    p.add_argument("path", help="the released checkpoint file (.safetensors / .bin / .pt) or its folder")
    p.add_argument("--out", required=True, help="folder to write config.json + model.safetensors to")
    p.add_argument("overrides", nargs="*", help="config fields the weights do not determine, e.g. image_size=256")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("push", help="upload a model folder, training checkpoint or run (EMA weights if any) to the "
                                    "Hugging Face Hub, with a generated model card")
    p.add_argument("checkpoint", help="model folder, checkpoint or run folder")
    p.add_argument("repo_id", help="org/name on the Hub (created if needed; HF_TOKEN or --token for access)")
    p.add_argument("--subfolder", default=None, help="a folder inside the repo")
    p.add_argument("--revision", default=None, help="a branch (created from main if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None)
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--no-ema", action="store_true", help="push the raw weights of a checkpoint instead of its EMA")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("compare", help="side-by-side table of evaluated runs (paper Table 2 layout)")
    p.add_argument("runs", nargs="+", help="run / eval folders or metrics.json files; the first is the baseline")
    p.add_argument("--names", nargs="+", default=None)
    p.add_argument("--baseline", type=int, default=0, help="index of the baseline run")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--curves", default=None, metavar="PNG", help="instead: overlay the runs' training curves (metrics.csv)")
    p.add_argument("--keys", nargs="+", default=["loss"], help="columns to plot with --curves")
    p.set_defaults(func=_cmd_compare)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    import os

    # under torchrun, info lines from rank 0 only (the other ranks would repeat them); warnings from all
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args, extra = ap.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = args.debug or debug
    # key=value overrides may follow options too (argparse only takes positionals before them)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in KEEP_FREED_MEMORY:
        from .machine import keep_freed_memory

        keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - every failure is one line (exit 2); --debug shows the traceback
        if args.debug:
            raise
        print(f"hieratok {args.command}: error: {_error_line(e)}", file=sys.stderr)
        return 2


def _error_line(e: BaseException) -> str:
    """One line a user can act on: the message of errors we raise; the kind, file and message of others."""
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device of {e.filename or 'the output folder'}"
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    text = " ".join(str(e).split()) or type(e).__name__
    known = (ValueError, FileNotFoundError, TypeError, KeyError, RuntimeError)
    plain = (ValueError, FileNotFoundError, MissingExtraError)  # their messages say it all
    msg = text if type(e) in known or isinstance(e, plain) else f"{type(e).__name__}: {text}"
    return msg + " (--debug shows the traceback)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
