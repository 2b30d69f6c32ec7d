"""Training tasks: what is optimised and how its loss is computed. The trainer owns the loop.

A task builds its trainable modules (``modules``), its training data, and lists its phases; each
phase names the modules (and so the optimizer) it updates and a loss function returning a dict
with ``loss``. Batches are tuples of tensors (images or latents or codes, labels).

- :class:`TokenizerTask`: HieraTok, stage 1 (one phase) or stage 2 (a discriminator phase with
  its own optimizer; optional VA-VAE alignment).
- :class:`ResTokTask`: ResTok with the release's objective (and optionally its GAN phase).
- :class:`DiTTask`: a DiT on cached tokenizer latents (diffusion or flow matching).
- :class:`ARTask`: a LlamaGen GPT on cached codes, next-hierarchy (HAR) or next-token layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..data import build_bucketed_dataset, build_dataset
from ..data.latent_cache import LatentCacheDataset, read_cache_meta
from ..generators import DiT, GeneratorObjective, sample_latents, training_loss
from ..generators.autoregressive import ARObjective, sample_layout, sequence_loss
from ..generators.llamagen import GPT
from ..losses.alignment import VFAlignmentLoss, build_frozen_encoder
from ..losses.gan import GANLoss
from ..losses.perceptual import build_perceptual
from ..losses.reconstruction import MultiScaleReconstructionLoss
from ..losses.restok import ResTokLoss, ResTokLossConfig
from ..metrics.codebook import CodebookUsage, shared_code_fraction
from ..registry import TOKENIZERS, load_model
from ..report import reconstruction_grid, save_samples_grid
from ..tokenizers import HieraTok, ResTok
from .config import GeneratorTrainConfig, TokenizerTrainConfig, TrainConfig, task_name
from .diagnostics import fixed_images, posterior_stats, reconstruction_diagnostics
from .parallel import unwrap

__all__ = ["Phase", "Task", "TokenizerTask", "ResTokTask", "DiTTask", "ARTask", "build_task"]

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """One optimisation phase of a step: ``loss_fn(modules, batch, ctx, step) -> {"loss": ..., ...}``.

    ``modules`` are the keys of the trained modules this phase's optimizer updates; ``active(step)``
    lets a phase (the discriminator) start late.
    """

    name: str
    modules: tuple[str, ...]
    loss_fn: Callable[[dict[str, nn.Module], torch.Tensor, dict[str, Any], int], dict[str, torch.Tensor]]
    lr: float
    end_lr: float
    warmup_ratio: float
    betas: tuple[float, float]
    weight_decay: float
    active: Callable[[int], bool] = lambda step: True


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Decayed and not-decayed parameters: biases and norms (fewer than 2 dims) and what a model's
    ``no_weight_decay()`` names (timm's convention; e.g. positional embeddings) are not decayed.
    ``modules`` may be wrapped (DDP, compile, FSDP2): names are read on the unwrapped module."""
    decay, no_decay = [], []
    for module in modules:
        inner = unwrap(module)
        skip = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else set()
        for n, p in inner.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or n in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Task:
    """What every task provides to the trainer."""

    cfg: TrainConfig
    modules: dict[str, nn.Module]
    # files or data specs that run code (torch.export programs, webdataset ``pipe:``) are refused
    # unless the user asks on the command line; a config file cannot set this
    allow_code_execution: bool = False
    visualize_runs_model = False  # whether ``visualize`` runs the trained model (not possible on one rank under FSDP)

    def frozen_modules(self) -> list[nn.Module]:
        """Non-trained modules that must follow the model to its device."""
        return []

    def state_modules(self) -> dict[str, nn.Module]:
        """Non-trained modules with state (buffers) that a checkpoint saves as ``<key>.safetensors``
        and resume restores; they must also be among :meth:`frozen_modules`."""
        return {}

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def build_dataset(self, rank: int, world_size: int) -> Any:
        raise NotImplementedError

    def visualize(self, modules: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any],
                  out_dir: Path, step: int) -> list[Path]:
        """Write images of the current state (reconstruction grids, sample grids); returns their
        files (``<kind>_<step>.png``), which the trainer also logs to TensorBoard / wandb."""
        return []

    @property
    def diag_every(self) -> int:
        """Steps between held-out diagnostics (0: this task has none)."""
        return 0

    @staticmethod
    def resume_structure(train_config: dict[str, Any]) -> dict[str, Any]:
        """The fields of a (saved) training config that decide which modules, state and optimizers a
        run of this task has: a checkpoint resumes only into a run that agrees on all of them."""
        return {"task": task_name(train_config.get("task", "hieratok"))}

    def diagnostic_images(self) -> Optional[tuple[torch.Tensor, str]]:
        """The fixed batch of the periodic diagnostics (on CPU) and a phrase saying what it is, or
        None: this task has no held-out diagnostics. Called once, on rank 0; must not use the
        global RNG."""
        return None

    def diagnostics(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metrics of ``model`` (unwrapped, eval mode, EMA weights if any, under no_grad) on the
        :meth:`diagnostic_images` batch ``x``: 0-d tensors under their CSV column names."""
        return {}

    def window_logs(self) -> dict[str, float]:
        """Logs over the training steps since the previous log row (e.g. codebook usage), under their
        CSV column names; called at every log step on every rank (it may all-reduce)."""
        return {}


def _optim_phase(cfg: TrainConfig, modules: tuple[str, ...], loss_fn: Callable) -> Phase:
    o = cfg.optim
    return Phase("g", modules, loss_fn, o.lr, o.end_lr, o.warmup_ratio, o.betas, o.weight_decay)


class TokenizerTask(Task):
    """HieraTok (or its single-scale twin): multi-scale reconstruction + KL, optionally GAN + VF alignment."""

    def __init__(self, cfg: TokenizerTrainConfig, allow_code_execution: bool = False) -> None:
        self.allow_code_execution = allow_code_execution
        perceptual = self._setup(cfg, HieraTok)
        model = self.modules["model"]
        self.loss = MultiScaleReconstructionLoss(cfg.loss, model.config.scales, perceptual)
        if cfg.vf.weight > 0:
            self.vf_encoder = build_frozen_encoder(cfg.vf.encoder, cfg.vf.path, self.allow_code_execution)
            feat_dim = self.vf_encoder.output_shape(model.config.image_size)[0]
            self.vf = VFAlignmentLoss(feat_dim, model.config.latent_channels, cfg.vf.margin_cos, cfg.vf.margin_dm,
                                      weight=cfg.vf.weight, adaptive=cfg.vf.adaptive)
            self.modules["vf_proj"] = self.vf

    def _setup(self, cfg: TokenizerTrainConfig, model_cls: Any, **model_defaults: Any) -> Optional[nn.Module]:
        """The parts both tokenizer tasks share: the model (from ``init_from``, whose saved config
        replaces the preset and where a ``model.*`` key that changes weights is an error, or from the
        preset), the GAN's discriminator (``gan.weight > 0``); returns the perceptual module."""
        self.cfg = cfg
        perceptual, self.perceptual_name = None, "none"
        if cfg.loss.perceptual > 0 and cfg.loss.perceptual_kind != "none":
            perceptual, self.perceptual_name = build_perceptual(cfg.loss.perceptual_kind)
        if cfg.init_from:
            log.info("model from %s (preset %r not used)", cfg.init_from, cfg.preset)
            model = model_cls.from_pretrained(cfg.init_from, **cfg.model)
        else:
            model = model_cls.from_preset(cfg.preset, **{**model_defaults, **cfg.model})
        self.model_config = model.config
        self.modules: dict[str, nn.Module] = {"model": model}
        self.gan = self.vf = self.vf_encoder = None
        if cfg.gan.weight > 0:
            self.gan = GANLoss(cfg.gan)
            self.modules["disc"] = self.gan.discriminator
        return perceptual

    def _add_gan_term(self, logs: dict[str, torch.Tensor], recs: list[torch.Tensor], step: int,
                      last_layer: torch.Tensor, rec_loss: torch.Tensor) -> None:
        """Add the GAN generator term to ``logs["loss"]`` (and its logs), leaving no gradients in the
        discriminator."""
        if self.gan is None:
            return
        disc = self.gan.discriminator
        disc.requires_grad_(False)
        g, glogs = self.gan.generator_loss(recs, step, rec_loss=rec_loss, last_layer=last_layer)
        disc.requires_grad_(True)
        logs["loss"] = logs["loss"] + g
        logs.update(glogs)

    @property
    def diag_every(self) -> int:
        return self.cfg.diag_every

    @staticmethod
    def resume_structure(train_config: dict[str, Any]) -> dict[str, Any]:
        """Besides the task: whether the GAN and alignment terms are on, and what builds their modules."""
        g, v = train_config.get("gan", {}), train_config.get("vf", {})
        out = {**Task.resume_structure(train_config), "gan.weight > 0": g.get("weight", 0) > 0,
               "vf.weight > 0": v.get("weight", 0) > 0}
        if out["gan.weight > 0"]:
            out.update({f"gan.{k}": g.get(k) for k in ("discriminator", "in_channels", "ndf", "n_layers", "norm", "num_groups")})
            out["gan.lecam_weight > 0"] = g.get("lecam_weight", 0) > 0
        if out["vf.weight > 0"]:
            out["vf.encoder"] = v.get("encoder")
        return out

    @property
    def image_size(self) -> int:
        return self.model_config.image_size

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.loss, self.vf_encoder, *self.state_modules().values()) if m is not None]

    def state_modules(self) -> dict[str, nn.Module]:
        """The LeCam logit averages (rank 0's are saved; every rank resumes from them)."""
        return {"lecam": self.gan.lecam} if self.gan is not None and self.gan.lecam is not None else {}

    def build_dataset(self, rank: int, world_size: int) -> Any:
        c, d = self.cfg, self.cfg.data
        if d.buckets:
            for h, w in d.buckets:
                self.modules["model"].check_image_size(h, w)  # a ValueError naming the size before any step
            return build_bucketed_dataset(d.path, d.buckets, seed=c.seed, length=d.samples_per_epoch,
                                          random_resized_crop_scale=d.random_resized_crop_scale, hflip=d.hflip,
                                          short_side=d.short_side)
        return build_dataset(d.path, "train", self.image_size, seed=c.seed, length=d.samples_per_epoch,
                             random_resized_crop_scale=d.random_resized_crop_scale, hflip=d.hflip, rank=rank,
                             world_size=world_size, short_side=d.short_side, allow_pipe=self.allow_code_execution)

    def diagnostic_images(self) -> Optional[tuple[torch.Tensor, str]]:
        """``diag_images`` images of ``diag_data``, else of the embedded photos' held-out split when
        training on the embedded photos, else fixed training images (centre crop, no flip: the data
        has no held-out split the config names)."""

        c, d = self.cfg, self.cfg.data
        source = c.diag_data or d.path
        # an evaluation split: centre crops, no flip, shards in order, every shard on this (the main) rank
        data = build_dataset(source, "heldout", self.image_size, seed=c.seed, short_side=d.short_side, rank=0,
                             world_size=1, on_error="none", allow_pipe=self.allow_code_execution)
        x = fixed_images(data, c.diag_images)
        if x.shape[0] == 0:
            raise ValueError(f"{source}: no readable image for the diagnostics: set diag_data=<folder> or diag_every=0")
        if c.diag_data:
            what = f"held-out images of {c.diag_data}"
        elif d.path is None:
            what = "crops of the embedded held-out photos (" + ", ".join(data.names) + ")"
        else:
            what = (f"TRAINING images of {d.path} (centre crops; the data has no held-out split: "
                    "set diag_data=<folder> for held-out images)")
        return x, f"{x.shape[0]} fixed {what}"

    def diagnostics(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-scale PSNR and colour error of the reconstructions (posterior mode in eval mode)."""

        recs = model(x)["reconstructions"]
        return reconstruction_diagnostics(x, [recs] if isinstance(recs, torch.Tensor) else list(recs))

    def visualize(self, modules: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any],
                  out_dir: Path, step: int) -> list[Path]:
        recs = ctx.get("recs", [[]])[0]
        if not recs:
            return []
        x = batch[0]
        n = min(4, x.shape[0])
        path = out_dir / f"recon_{step:08d}.png"
        reconstruction_grid(x[:n].float().cpu(), {"recon": [r[:n].float().cpu() for r in recs]}, path, max_images=n)
        return [path]

    def phases(self) -> list[Phase]:
        o, g = self.cfg.optim, self.cfg.gan
        gen = ("model",) + (("vf_proj",) if self.vf is not None else ())
        ph = [_optim_phase(self.cfg, gen, self.generator_loss)]
        if self.gan is not None:  # appendix E: its own AdamW, warm-up 1%, cosine
            ph.append(Phase("d", ("disc",), self.discriminator_loss, g.d_lr, g.d_lr * o.end_lr / o.lr, 0.01,
                            g.d_betas, g.d_weight_decay, active=self.gan.active))
        return ph

    def generator_loss(self, mods: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any],
                       step: int) -> dict[str, torch.Tensor]:
        """Multi-scale reconstruction + KL (+ GAN generator term + VF alignment)."""
        x = batch[0]
        out = mods["model"](x)
        recs = out["reconstructions"]
        logs = self.loss(x, recs, out["posterior"])
        logs.update(posterior_stats(out["posterior"]))  # on the device: read back with the other logs
        ctx.setdefault("recs", []).append([r.detach() for r in recs])
        model = unwrap(mods["model"])
        self._add_gan_term(logs, recs, step, model.last_layer(), logs["rec_loss"])
        if self.vf is not None:
            with torch.no_grad():
                feats = self.vf_encoder(x)
            v, vlogs = mods["vf_proj"](out["latent"], feats, rec_loss=logs["rec_loss"],
                                       last_layer=model.encoder.head.weight)
            logs["loss"] = logs["loss"] + v
            logs.update(vlogs)
        return logs

    def discriminator_loss(self, mods: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any],
                           step: int) -> dict[str, torch.Tensor]:
        """Hinge loss of the discriminator on real images vs the generator phase's reconstructions."""
        x = batch[0]
        i = ctx.setdefault("d_micro", 0)
        ctx["d_micro"] = i + 1
        assert self.gan is not None
        # the wrapped (DDP/FSDP) discriminator, so its gradients are reduced across ranks
        loss, logs = self.gan.discriminator_loss(x, ctx["recs"][i], step, discriminator=mods["disc"])
        return {"loss": loss, **logs}


class ResTokTask(TokenizerTask):
    """ResTok: the release's objective (MSE of [0, 1] images, perceptual on a random pad-and-crop of
    both images, VQ codebook + commitment; nested dropout in the model), optionally the GAN phase
    (``gan.*``; the release's settings are :func:`hieratok.losses.restok_gan_config`) and the
    foundation-feature alignment terms (``vf.weight > 0``: the model gets its two alignment heads,
    sized to the frozen ``vf.encoder``'s features; weight ``vf.weight``, cosine margin
    ``vf.margin_cos``; ``vf.margin_dm`` is not used). The warm-up of the generator phase is
    ``optim.warmup_steps`` when set."""

    def __init__(self, cfg: TokenizerTrainConfig, allow_code_execution: bool = False) -> None:
        self.allow_code_execution = allow_code_execution
        encoder, heads = self._alignment_encoder(cfg)
        perceptual = self._setup(cfg, ResTok, **heads)
        if encoder is not None:
            self._check_alignment_heads(encoder)
            self.vf_encoder = encoder
        self.loss = ResTokLoss(ResTokLossConfig(perceptual_weight=cfg.loss.perceptual, alignment_weight=cfg.vf.weight,
                                                alignment_margin=cfg.vf.margin_cos), perceptual)
        self.code_counts: Optional[CodebookUsage] = None  # codes the training batches used since the last log
        self.shared: Optional[torch.Tensor] = None  # (sum of shared-position fractions, batches) since the last log
        self.warned_shared = False

    def window_logs(self) -> dict[str, float]:
        """``codebook_usage`` (fraction of the codes used), ``codebook_perplexity`` (exp of the code
        entropy) and ``codes_shared`` (mean over batches of :func:`shared_code_fraction`: 1.0 when
        every image got the same code sequence) of the training batches since the previous log row,
        over all ranks. Warns once when the codes stop telling the images apart."""
        if self.code_counts is None:
            return {}
        st = self.code_counts.all_reduce_().compute()
        self.code_counts.reset()
        logs = {"codebook_usage": st.usage, "codebook_perplexity": st.perplexity}
        if self.shared is not None:  # per-rank batches of >= 2 images: the same on every rank
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(self.shared)
            logs["codes_shared"] = float(self.shared[0] / self.shared[1])
            self.shared = None
            if logs["codes_shared"] == 1.0 and not self.warned_shared:
                self.warned_shared = True
                log.warning("every image of every training batch since the last log row got the same code sequence "
                            "(codes_shared=1.0, %d codes in use): the codes no longer carry image information. Seen "
                            "with restok-tiny on short CPU runs, where no run at the release's commitment weight "
                            "recovered: the commitment term (model.commitment_beta, 0.25 as released) pulls every "
                            "latent onto one code while the decoder still outputs the mean image. "
                            "model.commitment_beta=0 model.init_std=0.08 kept them apart there; see BENCHMARKS.md "
                            "('restok-tiny').",
                            st.num_used)
        return logs

    def _alignment_encoder(self, cfg: TokenizerTrainConfig) -> tuple[Optional[nn.Module], dict[str, Any]]:
        """The frozen foundation encoder (None without alignment) and the model defaults it implies:
        both alignment heads of its feature width, or no heads."""
        if cfg.vf.weight <= 0:
            return None, {"encoder_alignment": False, "decoder_alignment": False}
        if cfg.vf.adaptive:
            raise ValueError("task 'restok' weights its alignment terms by the constant vf.weight (as released): "
                             "set vf.adaptive=false")


        encoder = build_frozen_encoder(cfg.vf.encoder, cfg.vf.path, self.allow_code_execution)
        if cfg.init_from:  # the saved config decides; checked against the encoder once built
            return encoder, {}
        size = ResTok.preset_config(cfg.preset, **cfg.model).image_size
        dim = encoder.output_shape(size)[0]
        return encoder, {"encoder_alignment": True, "decoder_alignment": True, "alignment_dim": dim}

    def _check_alignment_heads(self, encoder: nn.Module) -> None:
        c = self.model_config
        dim = encoder.feature_dim or encoder.output_shape(c.image_size)[0]
        if not (c.encoder_alignment or c.decoder_alignment):
            raise ValueError("vf.weight > 0 needs a ResTok with alignment heads (model.encoder_alignment / "
                             "model.decoder_alignment), or set vf.weight=0")
        if c.alignment_dim != dim:
            fix = "use a vf.encoder of that width" if self.cfg.init_from else f"set model.alignment_dim={dim}"
            raise ValueError(f"the ResTok's alignment heads project to {c.alignment_dim} channels, the frozen encoder "
                             f"{self.cfg.vf.encoder!r} gives {dim}: {fix}")

    def phases(self) -> list[Phase]:
        """The tokenizer phases, the generator's warm-up taken from ``optim.warmup_steps`` when set
        (the release: 5k steps)."""

        o = self.cfg.optim
        ph = super().phases()
        if o.warmup_steps is None:
            return ph
        if o.warmup_steps >= self.cfg.steps:
            log.warning("optim.warmup_steps=%d is not below steps=%d: the learning rate never reaches optim.lr=%g",
                        o.warmup_steps, self.cfg.steps, o.lr)
        frac = o.warmup_fraction(self.cfg.steps)
        return [replace(p, warmup_ratio=frac) if p.name == "g" else p for p in ph]

    def generator_loss(self, mods: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any],
                       step: int) -> dict[str, torch.Tensor]:
        """ResTok's reconstruction + perceptual + VQ loss (+ alignment terms + GAN generator term)."""
        x = batch[0]
        out = mods["model"](x)
        rec = out["reconstructions"]
        foundation: dict[str, torch.Tensor] = {}
        if self.vf_encoder is not None:
            feats = self.vf_encoder(x)  # (B, A, h, w), no graph
            # the release aligns the encoder with DINOv3's class token; a feature map gives no class
            # token, so its spatial mean stands in (the release's choice for SigLIP2, which has none)
            foundation = {"foundation_cls": feats.mean(dim=(2, 3)), "foundation_features": feats}
        logs = self.loss(x, out, step, **foundation)
        if self.code_counts is None:
            self.code_counts = CodebookUsage(self.model_config.codebook_size, device=x.device)
        self.code_counts.update(out["indices"], check=False)  # no host read: the quantizer's own indices
        if x.shape[0] > 1:
            frac = shared_code_fraction(out["indices"]).detach()
            one = torch.stack((frac, torch.ones_like(frac)))
            self.shared = one if self.shared is None else self.shared + one
        ctx.setdefault("recs", []).append([rec.detach()])
        self._add_gan_term(logs, [rec], step, unwrap(mods["model"]).last_layer(), logs["loss"])
        return logs


def _sample_decoder(cfg: GeneratorTrainConfig, meta: dict[str, Any]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The tokenizer decoder for sample grids (from the config or the cache's record), or None."""
    path = cfg.tokenizer or meta.get("tokenizer")
    if not path:
        return None
    try:
        tok, _ = load_model(path, expect=TOKENIZERS)
    except (FileNotFoundError, ValueError) as e:
        log.warning("sample grids off: tokenizer %s not loadable (%s)", path, e)
        return None

    @torch.no_grad()
    def decode(v: torch.Tensor, all_scales: bool = False) -> Any:
        return tok.detokenize(v.to(tok.last_layer().device), all_scales=all_scales)

    return decode


class _Forward:
    """A wrapped (DDP) model seen by the generator loss functions: calls go through the wrapper, so
    gradients are all-reduced, and attributes (``config``, ``normalizer``) come from the model inside."""

    def __init__(self, wrapped: nn.Module) -> None:
        self._wrapped, self._model = wrapped, unwrap(wrapped)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class _CachedTask(Task):
    """Shared by the generator tasks: data from a latent/code cache made by ``hieratok cache-latents``."""

    visualize_runs_model = True

    def __init__(self, cfg: GeneratorTrainConfig, allow_code_execution: bool = False) -> None:
        self.allow_code_execution = allow_code_execution
        if not cfg.data.path:
            raise ValueError(f"task {cfg.task!r} trains on a latent cache: pass --data <cache dir> "
                             "(make one with `hieratok cache-latents`)")
        self.cfg = cfg
        self.meta = read_cache_meta(cfg.data.path)
        self._decoder: Any = "unset"

    def build_dataset(self, rank: int, world_size: int) -> Any:
        return LatentCacheDataset(self.cfg.data.path)

    def _decode(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        if self._decoder == "unset":
            self._decoder = _sample_decoder(self.cfg, self.meta)
        return self._decoder

    def phases(self) -> list[Phase]:
        return [_optim_phase(self.cfg, ("model",), self.loss)]

    def loss(self, mods: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any],
             step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _sample(self, model: nn.Module, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents or codes for ``labels`` (model in eval mode)."""
        raise NotImplementedError

    def visualize(self, modules: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any],
                  out_dir: Path, step: int) -> list[Path]:
        """A grid of class-conditional samples (fixed seed and labels), decoded by the tokenizer."""

        decode = self._decode()
        if decode is None:
            return []
        model = unwrap(modules["model"])
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        labels = torch.arange(self.cfg.sample_count, device=dev) % self.num_classes
        with torch.no_grad():
            images = decode(self._sample(model, labels, torch.Generator().manual_seed(self.cfg.seed)).cpu())
        model.train(was)
        path = out_dir / f"samples_{step:08d}.png"
        save_samples_grid(images.float().clamp(-1, 1), path, nrow=min(8, images.shape[0]))
        return [path]


class DiTTask(_CachedTask):
    """DiT on tokenizer latents (paper appendix F): diffusion (eps, learned variance) or flow matching."""

    def __init__(self, cfg: GeneratorTrainConfig, allow_code_execution: bool = False) -> None:
        super().__init__(cfg, allow_code_execution)

        if self.meta.get("kind") != "latents":
            raise ValueError(f"{cfg.data.path} caches {self.meta.get('kind')}, a DiT needs latents")
        C, H, _ = self.meta["shape"]
        self.objective = GeneratorObjective(**cfg.objective)
        over = {"in_channels": C, "input_size": H, "num_classes": self.meta["num_labels"],
                "latent_mean": self.meta["mean"], "latent_std": self.meta["std"],
                "learn_sigma": self.objective.kind == "diffusion", **cfg.model}
        self.modules = {"model": DiT(DiT.preset_config(cfg.preset, **over))}
        self.num_classes = self.modules["model"].config.num_classes

    def loss(self, mods: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        z, y = batch
        return training_loss(_Forward(mods["model"]), self.objective, z.float(), y.long())

    def _sample(self, model: nn.Module, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return sample_latents(model, self.objective, labels, self.cfg.sample_cfg_scale, generator)


class ARTask(_CachedTask):
    """LlamaGen GPT on tokenizer codes: ResTok's next-hierarchy (HAR) or plain next-token layout."""

    def __init__(self, cfg: GeneratorTrainConfig, allow_code_execution: bool = False) -> None:
        super().__init__(cfg, allow_code_execution)

        if self.meta.get("kind") != "codes":
            raise ValueError(f"{cfg.data.path} caches {self.meta.get('kind')}, an AR generator needs codes")
        (N,) = self.meta["shape"]
        obj = ARObjective.from_dict(cfg.objective)
        self.layout, self.sampling = obj.sequence_layout(N), obj.sampling_kwargs()
        over = {"num_classes": self.meta["num_labels"], **({"vocab_size": self.meta["codebook_size"]}
                                                         if "codebook_size" in self.meta else {}), **cfg.model}
        self.modules = {"model": GPT(GPT.preset_config(cfg.preset, **over))}
        mc = self.modules["model"].config
        self.num_classes = mc.num_classes
        # the data are checked here once (cache.json records their ranges), not at every step
        lo, hi = self.meta.get("code_range", (0, 0))
        if lo < 0 or hi >= mc.vocab_size or self.meta["num_labels"] > mc.num_classes:
            raise ValueError(f"{cfg.data.path}: codes in [{lo}, {hi}] and {self.meta['num_labels']} labels do not fit "
                             f"a GPT with vocab_size {mc.vocab_size} and num_classes {mc.num_classes}")

    def loss(self, mods: dict[str, nn.Module], batch: tuple[torch.Tensor, ...], ctx: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        codes, y = batch
        return {"loss": sequence_loss(_Forward(mods["model"]), codes.long(), y.long(), self.layout)}

    def _sample(self, model: nn.Module, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return sample_layout(model, labels, self.layout, cfg_scale=self.cfg.sample_cfg_scale, generator=generator,
                             **self.sampling).codes


TASKS: dict[str, type[Task]] = {"hieratok": TokenizerTask, "restok": ResTokTask, "dit": DiTTask, "ar": ARTask}


def build_task(cfg: TrainConfig, allow_code_execution: bool = False) -> Task:
    """The task a config names (``allow_code_execution``: see :attr:`Task.allow_code_execution`)."""
    return TASKS[task_name(cfg.task)](cfg, allow_code_execution=allow_code_execution)
