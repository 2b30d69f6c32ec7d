"""Training tasks: what is optimised and how its loss is computed. The trainer owns the loop.

A task builds its trainable modules (``modules``) and lists its phases; each phase names the
module (and so the optimizer) it updates and a loss function returning a dict with ``loss``.
Stage 1 has one phase; stage 2 (GAN) adds a discriminator phase with its own optimizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..losses.reconstruction import MultiScaleReconstructionLoss
from ..tokenizers import HieraTok
from .config import TrainConfig

__all__ = ["Phase", "TokenizerTask"]

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


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norms, positional and scale embeddings are not weight-decayed."""
    return p.ndim < 2 or "pos" in name or "scale_embed" in name


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for module in modules:
        for n, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(n, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TokenizerTask:
    """HieraTok (or its single-scale twin): multi-scale reconstruction + KL, optionally GAN + VF alignment."""

    def __init__(self, cfg: TrainConfig, perceptual: Optional[nn.Module] = None, perceptual_name: str = "none") -> None:
        self.cfg = cfg
        if cfg.init_from:
            model = HieraTok.from_pretrained(cfg.init_from, **{k: v for k, v in cfg.model.items() if k in ("attn_backend", "decoder_drop_path", "encoder_drop_path")})
        else:
            model = HieraTok.from_preset(cfg.preset, **cfg.model)
        self.model_config = model.config
        self.modules: dict[str, nn.Module] = {"model": model}
        self.loss = MultiScaleReconstructionLoss(cfg.loss, len(model.config.scales), perceptual)
        self.perceptual_name = perceptual_name
        self.gan = self.vf = self.vf_encoder = None
        if cfg.gan.weight > 0:
            from ..losses.gan import GANLoss

            self.gan = GANLoss(cfg.gan)
            self.modules["disc"] = self.gan.discriminator
        if cfg.vf.weight > 0:
            from ..losses.alignment import VFAlignmentLoss, build_frozen_encoder

            self.vf_encoder = build_frozen_encoder(cfg.vf.encoder, cfg.vf.path)
            feat_dim = self.vf_encoder.output_shape(model.config.image_size)[0]
            self.vf = VFAlignmentLoss(feat_dim, model.config.latent_channels, cfg.vf.margin_cos, cfg.vf.margin_dm,
                                      weight=cfg.vf.weight, adaptive=cfg.vf.adaptive)
            self.modules["vf_proj"] = self.vf

    @property
    def image_size(self) -> int:
        return self.model_config.image_size

    def frozen_modules(self) -> list[nn.Module]:
        """Non-trained modules that must follow the model to its device."""
        return [m for m in (self.loss, self.vf_encoder) if m is not None]

    def phases(self) -> list[Phase]:
        o, g = self.cfg.optim, self.cfg.gan
        gen = ("model",) + (("vf_proj",) if self.vf is not None else ())
        ph = [Phase("g", gen, self.generator_loss, o.lr, o.end_lr, o.warmup_ratio, o.betas, o.weight_decay)]
        if self.gan is not None:  # appendix E: its own AdamW, warm-up 1%, cosine
            ph.append(Phase("d", ("disc",), self.discriminator_loss, g.d_lr, g.d_lr * o.end_lr / o.lr, 0.01,
                            g.d_betas, g.d_weight_decay, active=self.gan.active))
        return ph

    def generator_loss(self, mods: dict[str, nn.Module], x: torch.Tensor, ctx: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Multi-scale reconstruction + KL (+ GAN generator term + VF alignment)."""
        out = mods["model"](x)
        recs = out["reconstructions"]
        logs = self.loss(x, recs, out["posterior"])
        ctx.setdefault("recs", []).append([r.detach() for r in recs])
        model = mods["model"].module if hasattr(mods["model"], "module") else mods["model"]
        if self.gan is not None:
            disc = self.gan.discriminator
            disc.requires_grad_(False)  # the generator term must not leave gradients in the discriminator
            g, glogs = self.gan.generator_loss(recs, step, rec_loss=logs["loss"], last_layer=model.decoder.head.weight)
            disc.requires_grad_(True)
            logs["loss"] = logs["loss"] + g
            logs.update(glogs)
        if self.vf is not None:
            with torch.no_grad():
                feats = self.vf_encoder(x)
            v, vlogs = mods["vf_proj"](out["latent"], feats, rec_loss=logs["loss"],
                                       last_layer=model.encoder.head.weight)
            logs["loss"] = logs["loss"] + v
            logs.update(vlogs)
        return logs

    def discriminator_loss(self, mods: dict[str, nn.Module], x: torch.Tensor, ctx: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Hinge loss of the discriminator on real images vs the generator phase's reconstructions."""
        i = ctx.setdefault("d_micro", 0)
        ctx["d_micro"] = i + 1
        assert self.gan is not None
        # the wrapped (DDP/FSDP) discriminator, so its gradients are reduced across ranks
        loss, logs = self.gan.discriminator_loss(x, ctx["recs"][i], step, discriminator=mods["disc"])
        return {"loss": loss, **logs}
