"""The ResTok training objective (released ``restok_l_128`` configuration).

``total = w_rec * L2 + w_perc * LPIPS + w_vq * L_vq + w_align * (L_enc + L_dec) + GAN``

* L2: mean squared error of images in [0, 1] (the release's scale; with our [-1, 1] images
  that is ``mse(x, x_hat) / 4``), weight 1.0.
* LPIPS: weight 1.0 (any perceptual module taking [-1, 1] images, e.g. :class:`LPIPS`), on a
  random pad-and-crop of both images as in the release's training (``padding_and_trimming`` in
  its ``modeling/modules/perceptual_loss.py``; :func:`perceptual_pad_crop`): both are padded by
  15 px (replicate), the same window is cut from both, each edge moved in by 0..15 px drawn
  independently, and resized back (bicubic). ``perceptual_pad_crop=False`` compares the images
  as they are.
* L_vq: the quantizer's ``codebook + 0.25 * commitment`` loss, weight 1.0.
* Alignment with a frozen foundation model (DINOv3-L in the release), weight 1.0, cosine margin
  m = 0.25: ``L_enc = mean_b relu(1 - m - cos(mean_n P_e(t_bn), cls_b))`` between the projected
  coarsest encoder image tokens (averaged over tokens) and the foundation CLS token, and
  ``L_dec = mean_{b,ij} relu(1 - m - cos(P_d(f_bij), F_bij))`` between the projected decoder
  alignment features and the foundation patch features at every grid position.
* GAN (:func:`restok_gan_config`): hinge loss, generator weight 0.5 from step 20k, LeCam 1e-3
  on the batch-mean logits with EMA decay 0.999 (``lecam_form="mean"``), discriminator AdamW
  lr 1e-4, betas (0.9, 0.95), weight decay 1e-4. The release's discriminator is the frozen-DINO
  one with DiffAugment: ``restok_gan_config(release_discriminator=True)`` (needs the DINO
  ViT-S/16 weights); the default is the PatchGAN, which needs no download.

Legend: B batch, A foundation feature width, G token grid side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import cosine_margin_loss, resize_features
from .dino_disc import DIFFAUG_POLICY
from .gan import GANConfig, GANLoss

__all__ = ["ResTokLossConfig", "ResTokLoss", "restok_gan_config", "cosine_margin_loss", "perceptual_pad_crop"]


def restok_gan_config(release_discriminator: bool = False, **overrides: Any) -> GANConfig:
    """The release's adversarial settings as a :class:`GANConfig` (see the module docstring);
    ``release_discriminator`` adds its DINO discriminator and DiffAugment policy."""
    base: dict[str, Any] = dict(weight=0.5, start_step=20_000, loss="hinge", lecam_weight=1e-3, lecam_decay=0.999,
                                lecam_form="mean", d_lr=1e-4, d_betas=(0.9, 0.95), d_weight_decay=1e-4)
    if release_discriminator:
        base.update(discriminator="dino", diffaug=DIFFAUG_POLICY)
    return GANConfig(**{**base, **overrides})


def perceptual_pad_crop(
    a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, pad: int = 15, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random pad-and-crop of two image batches (the release's perceptual-loss input).

    Both batches are padded by ``pad`` pixels on every side (edge pixels repeated); one window is
    cut from both, its top, bottom, left and right edges each moved inwards by an offset drawn
    uniformly from ``0..pad`` (in that order, one window for the whole batch), and resized back
    to (H, W) with bicubic interpolation. Padding and interpolation are affine-invariant, so the
    result on [-1, 1] images equals the release's on [0, 1] ones.

    Args:
        a_BCHW, b_BCHW: two batches of the same shape (reconstruction and target).
        pad: padding and largest offset (15 in the release).
        generator: source of the four offsets (default: torch's global generator). The offsets are
            drawn on the generator's device and read back as Python ints.
    """
    if a_BCHW.shape != b_BCHW.shape or a_BCHW.ndim != 4:
        raise ValueError(f"need two (B, C, H, W) batches of one shape, got {tuple(a_BCHW.shape)}, {tuple(b_BCHW.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0:
        return a_BCHW, b_BCHW
    H, W = a_BCHW.shape[-2:]
    device = generator.device if generator is not None else torch.device("cpu")
    top, bottom, left, right = torch.randint(0, pad + 1, (4,), generator=generator, device=device).tolist()
    Hp, Wp = H + 2 * pad, W + 2 * pad

    def window(x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BCHW = F.pad(x_BCHW, (pad, pad, pad, pad), mode="replicate")[..., top:Hp - bottom, left:Wp - right]
        return F.interpolate(x_BCHW, size=(H, W), mode="bicubic", align_corners=False)

    return window(a_BCHW), window(b_BCHW)


@dataclass
class ResTokLossConfig:
    """Weights of the ResTok objective (defaults: the release).

    ``perceptual_pad_crop``: feed the perceptual term a random pad-and-crop of both images
    (:func:`perceptual_pad_crop`, ``perceptual_pad`` pixels), as the release's training does.
    """

    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    quantizer_weight: float = 1.0
    alignment_weight: float = 1.0
    alignment_margin: float = 0.25
    perceptual_pad_crop: bool = True
    perceptual_pad: int = 15

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            if v < 0:
                raise ValueError(f"{k} must be >= 0, got {v}")
        if isinstance(self.perceptual_pad, bool) or not isinstance(self.perceptual_pad, int):
            raise ValueError(f"perceptual_pad must be an integer number of pixels, got {self.perceptual_pad!r}")


class ResTokLoss(nn.Module):
    """Generator-side ResTok loss; the discriminator step goes through :meth:`discriminator_loss`.

    Args:
        config: weights (the release's by default).
        perceptual: module ``(x, y) -> (B,)`` distances on [-1, 1] images, or None (term off).
        gan: a :class:`GANLoss` (e.g. ``GANLoss(restok_gan_config())``), or None (term off).
    """

    def __init__(self, config: Optional[ResTokLossConfig] = None, perceptual: Optional[nn.Module] = None,
                 gan: Optional[GANLoss] = None) -> None:
        super().__init__()
        self.config = config if config is not None else ResTokLossConfig()
        self.perceptual = perceptual
        self.gan = gan

    def forward(
        self,
        x_BCHW: torch.Tensor,
        out: dict[str, Any],
        step: int,
        *,
        foundation_cls: Optional[torch.Tensor] = None,
        foundation_features: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """Loss of one batch.

        Args:
            x_BCHW: input images in [-1, 1].
            out: the dict of :meth:`ResTok.forward`.
            step: global step (for the GAN start).
            foundation_cls: (B, A) foundation CLS features (enables the encoder alignment term
                when ``out`` has ``encoder_alignment``).
            foundation_features: (B, A, h, w) foundation patch features (decoder term, when
                ``out`` has ``decoder_alignment``); resized to the decoder grid if needed.
            generator: source of the perceptual pad-and-crop window (default: torch's global
                generator).

        Returns:
            ``{"loss": total}`` plus the detached terms ``l2``, ``vq``, ``commitment`` and
            ``codebook``; ``perceptual`` only with a perceptual module and a weight > 0;
            ``align_enc`` / ``align_dec`` only when that term is on (see the arguments);
            ``g_loss`` and ``g_weight`` only with a GAN.
        """
        c = self.config
        rec = out["reconstructions"]
        l2 = F.mse_loss(rec.float(), x_BCHW.float()) / 4.0  # MSE of [0, 1] images
        total = c.reconstruction_weight * l2 + c.quantizer_weight * out["vq_loss"]
        logs = {"l2": l2.detach(), "vq": out["vq_loss"].detach(), "commitment": out["commitment_loss"].detach(),
                "codebook": out["codebook_loss"].detach()}
        if self.perceptual is not None and c.perceptual_weight > 0:
            x_p, rec_p = x_BCHW, rec
            if c.perceptual_pad_crop:
                x_p, rec_p = perceptual_pad_crop(x_BCHW, rec, c.perceptual_pad, generator)
            p = self.perceptual(x_p, rec_p).mean()
            total = total + c.perceptual_weight * p
            logs["perceptual"] = p.detach()
        if foundation_cls is not None and "encoder_alignment" in out:
            enc = cosine_margin_loss(out["encoder_alignment"].mean(dim=1), foundation_cls, c.alignment_margin)
            total = total + c.alignment_weight * enc
            logs["align_enc"] = enc.detach()
        if foundation_features is not None and "decoder_alignment" in out:
            pred = out["decoder_alignment"]
            feat = resize_features(foundation_features.detach().float(), tuple(pred.shape[-2:]))
            dec = cosine_margin_loss(pred, feat, c.alignment_margin)
            total = total + c.alignment_weight * dec
            logs["align_dec"] = dec.detach()
        if self.gan is not None:
            g, glogs = self.gan.generator_loss(rec, step)
            total = total + g
            logs.update(glogs)
        logs["loss"] = total
        return logs

    def discriminator_loss(
        self, x_BCHW: torch.Tensor, out: dict[str, Any], step: int, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real images vs (detached) reconstructions (see :class:`GANLoss`)."""
        if self.gan is None:
            raise ValueError("this ResTokLoss has no GAN")
        return self.gan.discriminator_loss(x_BCHW, out["reconstructions"], step, **kwargs)
