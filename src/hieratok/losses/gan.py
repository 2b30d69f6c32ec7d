"""Adversarial loss for the stage-2 tokenizer training (HieraTok appendix E: GAN weight 0.6).

* :class:`PatchDiscriminator` -- the PatchGAN ("NLayerDiscriminator") of pix2pix as used by
  taming-transformers (VQGAN) and LDM: a stack of 4x4 convolutions, LeakyReLU(0.2), one logit
  per overlapping patch. ``discriminator="dino"`` uses the frozen-DINO discriminator of ResTok's
  release instead (:mod:`hieratok.losses.dino_disc`), usually with DiffAugment (``diffaug``).
* Loss functions on raw logits: :func:`hinge_d_loss` / :func:`hinge_g_loss` and the
  non-saturating (logistic) pair, plus the LeCam regulariser (Tseng et al. 2021,
  :func:`lecam_regularizer` with :class:`LeCamEMA`).
* :func:`adaptive_gan_weight` -- VQGAN's balance between the reconstruction and GAN gradients at
  the decoder's last layer (an option; the paper uses a fixed weight).
* :class:`GANLoss` -- the config-driven module a trainer holds: it owns the discriminator and turns
  reconstructions (one image or the coarse-to-fine pyramid of a HieraTok) into the generator's
  weighted loss and the discriminator's loss.

Images are in [-1, 1]. Legend: B batch, C channels, H height, W width.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .dino_disc import DinoDiscriminator, diff_augment, diffaug_groups
from .reconstruction import scale_targets

__all__ = [
    "DISCRIMINATOR_NORMS",
    "GAN_LOSS_TYPES",
    "GANConfig",
    "GANLoss",
    "LeCamEMA",
    "PatchDiscriminator",
    "adaptive_gan_weight",
    "grad_norm_ratio",
    "hinge_d_loss",
    "hinge_g_loss",
    "lecam_regularizer",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
]

logger = logging.getLogger(__name__)

DISCRIMINATOR_NORMS = ("group", "batch", "none")
DISCRIMINATORS = ("patch", "dino")
GAN_LOSS_TYPES = ("hinge", "non_saturating")
LECAM_FORMS = ("elementwise", "mean")

Images = Union[torch.Tensor, Sequence[torch.Tensor]]

# --------------------------------------------------------------------------------------------
# discriminator
# --------------------------------------------------------------------------------------------

_KERNEL, _PAD = 4, 1


def _norm_layer(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # gcd keeps narrow test discriminators valid (16 channels, 32 groups -> 16 groups)
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming-transformers ``NLayerDiscriminator``).

    Layout for ``n_layers = 3`` and ``ndf = 64`` (taming's and LDM's default)::

        conv 4x4/2   3 ->  64, LeakyReLU(0.2)
        conv 4x4/2  64 -> 128, norm, LeakyReLU(0.2)
        conv 4x4/2 128 -> 256, norm, LeakyReLU(0.2)
        conv 4x4/1 256 -> 512, norm, LeakyReLU(0.2)
        conv 4x4/1 512 ->   1                        (one logit per patch)

    Channel multipliers double per layer and are capped at 8. With a norm layer the convolutions
    before it carry no bias (the norm's shift replaces it). Initialisation as in taming: conv
    weights N(0, 0.02); norm scales N(1, 0.02) and shifts 0 (applied to GroupNorm too).

    Norm choice. LDM uses BatchNorm. The default here is GroupNorm (32 groups), because
    BatchNorm is fragile in this setting: per-GPU batches in GAN training are small (the paper's
    256 global batch is 4-8 per GPU), DDP keeps per-rank statistics and overwrites the buffers
    from rank 0 on every forward, the real and fake batches are normalised with different batch
    statistics (a shortcut the discriminator can exploit), and the generator step's forward on
    fakes updates the running statistics. GroupNorm normalises each sample on its own, so the
    output of a sample does not depend on the rest of the batch. ``norm="batch"`` reproduces LDM.

    Args:
        in_channels: image channels.
        ndf: channels of the first convolution.
        n_layers: number of stride-2 convolutions (the receptive field grows with it: 70 px for 3).
        norm: ``"group"`` (default), ``"batch"`` (LDM) or ``"none"``.
        num_groups: groups of the GroupNorm layers (reduced to divide the channel count).
    """

    def __init__(
        self,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "group",
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if norm not in DISCRIMINATOR_NORMS:
            raise ValueError(f"discriminator norm must be one of {DISCRIMINATOR_NORMS}, got {norm!r}")
        for name, v in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers), ("num_groups", num_groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.n_layers = n_layers
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, _KERNEL, stride=2, padding=_PAD),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, _KERNEL, stride=stride, padding=_PAD, bias=bias),
                _norm_layer(norm, ndf * mult, num_groups),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, _KERNEL, stride=1, padding=_PAD))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)  # taming leaves conv biases at PyTorch's default
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def output_size(self, size: int) -> int:
        """Side of the logit map for an input side ``size`` (conv arithmetic, no forward)."""
        for m in self.main:
            if isinstance(m, nn.Conv2d):
                size = (size + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
                if size < 1:
                    return 0
        return size

    @property
    def min_input_size(self) -> int:
        """Smallest input side that yields at least one logit (24 px for ``n_layers = 3``)."""
        size = 1
        while self.output_size(size) < 1:
            size += 1
        return size

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h, w) for images (B, C, H, W) in [-1, 1]."""
        if x_BCHW.ndim != 4:
            raise ValueError(f"discriminator expects (B, C, H, W) images, got shape {tuple(x_BCHW.shape)}")
        if min(x_BCHW.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"discriminator with n_layers={self.n_layers} needs images of at least "
                f"{self.min_input_size} px, got {tuple(x_BCHW.shape[-2:])}"
            )
        return self.main(x_BCHW)


# --------------------------------------------------------------------------------------------
# losses on logits
# --------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss paired with the hinge discriminator loss: ``-mean(fake)``."""
    return -logits_fake.mean()


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``.

    Equals the binary cross-entropy with real labelled 1 and fake 0 (taming's "vanilla" loss).
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean(softplus(-fake)) = -mean(log sigmoid(fake))``."""
    return F.softplus(-logits_fake).mean()


_D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
_G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def lecam_regularizer(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    ema_real: torch.Tensor | float,
    ema_fake: torch.Tensor | float,
) -> torch.Tensor:
    """LeCam regulariser (Tseng et al. 2021, "Regularizing GANs under limited data").

    Added to the discriminator loss (weight 1e-3 is usual).

    ``mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)``: it pulls the real logits
    towards the running mean of the fake logits and vice versa, which bounds the discriminator's
    predictions when data is scarce. The EMAs are constants (no gradient). ResTok's release
    passes the batch-mean logits (0-dim tensors) instead (``GANConfig.lecam_form="mean"``).

    Args:
        logits_real: discriminator logits on real images, any shape.
        logits_fake: discriminator logits on reconstructions, any shape.
        ema_real: moving average of the mean real logit (see :class:`LeCamEMA`).
        ema_fake: moving average of the mean fake logit.
    """
    if isinstance(ema_real, torch.Tensor):
        ema_real = ema_real.detach()
    if isinstance(ema_fake, torch.Tensor):
        ema_fake = ema_fake.detach()
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


class LeCamEMA(nn.Module):
    """Exponential moving averages of the mean real and fake logits for :func:`lecam_regularizer`.

    ``ema <- decay * ema + (1 - decay) * mean(logits)``; the first update sets the averages to the
    current means (the reference code starts from a large constant and disables the decay for a
    warm-up; starting from the first observation avoids that transient). The averages are
    buffers: they follow ``.to(device)``, and the trainer moves them with the model and saves them
    in its checkpoints (``lecam.safetensors``, see ``TokenizerTask.state_modules``). Under DDP each
    rank keeps its own averages of its local logits; checkpoints keep rank 0's, which every rank
    resumes from.

    Args:
        decay: EMA decay (0.99 in the reference implementation).
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCam EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """Fold the mean of the current logits into the averages."""
        r = logits_real.detach().float().mean().to(self.ema_real)
        f = logits_fake.detach().float().mean().to(self.ema_fake)
        # branch-free first update: decay 0 while not initialised (no host sync on GPU)
        d = torch.where(self.initialized, torch.full_like(self.ema_real, self.decay), torch.zeros_like(self.ema_real))
        self.ema_real.copy_(d * self.ema_real + (1 - d) * r)
        self.ema_fake.copy_(d * self.ema_fake + (1 - d) * f)
        self.initialized.fill_(True)


# --------------------------------------------------------------------------------------------
# adaptive weight
# --------------------------------------------------------------------------------------------


def grad_norm_ratio(
    numerator_loss: torch.Tensor,
    denominator_loss: torch.Tensor,
    layer: torch.Tensor,
    *,
    eps: float = 1e-4,
    max_value: float = 1e4,
) -> torch.Tensor:
    """``||d numerator / d layer|| / (||d denominator / d layer|| + eps)``, clamped to [0, max], detached.

    Both graphs are kept (``retain_graph``) so the caller can still back-propagate the total loss.
    """
    g_num = torch.autograd.grad(numerator_loss, layer, retain_graph=True)[0]
    g_den = torch.autograd.grad(denominator_loss, layer, retain_graph=True)[0]
    ratio = torch.linalg.vector_norm(g_num) / (torch.linalg.vector_norm(g_den) + eps)
    return ratio.clamp(0.0, max_value).detach()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """VQGAN's adaptive GAN weight (Esser et al. 2021, eq. 7).

    ``lambda = ||grad_L(rec_loss)|| / (||grad_L(g_loss)|| + 1e-4)``, ``L`` the decoder's last layer
    weight, clamped to [0, 1e4] and detached; the generator then minimises
    ``rec_loss + lambda * disc_weight * g_loss``.

    Args:
        rec_loss: scalar reconstruction (+ perceptual) loss.
        g_loss: scalar generator adversarial loss.
        last_layer: the weight tensor of the decoder's output layer.
        eps: added to the GAN gradient norm.
        max_weight: upper clamp.

    Returns:
        A detached scalar tensor.
    """
    return grad_norm_ratio(rec_loss, g_loss, last_layer, eps=eps, max_value=max_weight)


# --------------------------------------------------------------------------------------------
# config-driven loss module
# --------------------------------------------------------------------------------------------


@dataclass
class GANConfig:
    """Stage-2 adversarial training (paper appendix E; unlisted values follow taming / LDM).

    Attributes:
        weight: GAN loss weight in the generator objective (0.6 in the paper). With
            ``adaptive_weight`` it multiplies the adaptive factor instead.
        start_step: global step from which the GAN is on (both losses are 0 before it).
        loss: ``"hinge"`` (taming, LDM) or ``"non_saturating"``.
        adaptive_weight: use VQGAN's grad-norm-ratio weight (needs ``rec_loss`` and
            ``last_layer`` in :meth:`GANLoss.generator_loss`); the paper uses a fixed weight.
        adaptive_max: clamp of the adaptive factor.
        all_scales: apply the GAN to every scale of the pyramid at or above ``min_size`` (the
            loss is the mean over those scales); otherwise only to the finest scale.
        min_size: scales whose short side is below this are skipped with ``all_scales``
            (a 3-layer PatchGAN gives only a 2x2 logit map at 32 px and nothing below 24 px).
        ndf, n_layers, norm, num_groups: see :class:`PatchDiscriminator`.
        lecam_weight: weight of the LeCam regulariser in the discriminator loss (0 = off;
            1e-3 is the usual value).
        lecam_decay: decay of the logit EMAs used by LeCam.
        lecam_form: ``"elementwise"`` (Tseng et al.): every logit against the averages updated
            with this batch first, which start at the first batch's means; ``"mean"`` (ResTok's
            release, from TiTok): the batch-mean logits against the averages before this step's
            update, which start at 0.
        d_lr, d_betas, d_weight_decay: AdamW of the discriminator (betas from appendix E; the
            paper does not list the learning rate or weight decay).
        discriminator: ``"patch"`` (PatchGAN) or ``"dino"`` (ResTok's release; needs the DINO
            ViT-S/16 weights, ``dino_weights`` or ``$HIERATOK_DINO_WEIGHTS``).
        dino_weights, dino_pretrained: see :class:`~hieratok.losses.dino_disc.DinoDiscriminator`.
        diffaug: DiffAugment policy applied to reals and fakes before the discriminator ("" = off;
            the release: ``"color,translation,cutout_0.2"``).
    """

    weight: float = 0.6
    start_step: int = 0
    loss: str = "hinge"
    adaptive_weight: bool = False
    adaptive_max: float = 1e4
    all_scales: bool = False
    min_size: int = 32
    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"
    num_groups: int = 32
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99
    lecam_form: str = "elementwise"
    d_lr: float = 1e-4
    d_betas: tuple[float, float] = (0.9, 0.95)
    d_weight_decay: float = 0.0
    discriminator: str = "patch"
    dino_weights: Optional[str] = None
    dino_pretrained: bool = True
    diffaug: str = ""

    def __post_init__(self) -> None:
        if self.discriminator not in DISCRIMINATORS:
            raise ValueError(f"discriminator must be one of {DISCRIMINATORS}, got {self.discriminator!r}")
        diffaug_groups(self.diffaug)  # an unknown group fails here, not at the first GAN step
        if self.lecam_form not in LECAM_FORMS:
            raise ValueError(f"lecam_form must be one of {LECAM_FORMS}, got {self.lecam_form!r}")
        if self.loss not in GAN_LOSS_TYPES:
            raise ValueError(f"GAN loss must be one of {GAN_LOSS_TYPES}, got {self.loss!r}")
        if self.norm not in DISCRIMINATOR_NORMS:
            raise ValueError(f"discriminator norm must be one of {DISCRIMINATOR_NORMS}, got {self.norm!r}")
        if self.weight < 0 or self.lecam_weight < 0:
            raise ValueError(f"GAN weights must be >= 0, got weight={self.weight}, lecam_weight={self.lecam_weight}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")
        self.d_betas = tuple(self.d_betas)  # JSON gives a list
        if len(self.d_betas) != 2:
            raise ValueError(f"d_betas must be two numbers, got {self.d_betas!r}")


class GANLoss(nn.Module):
    """Generator and discriminator losses of stage 2, owning the discriminator.

    A trainer runs, per step: the generator update with
    ``total = rec + ... + gan.generator_loss(recs, step)[0]``, then (when
    :meth:`active` is true) the discriminator update with ``gan.discriminator_loss(x, recs, step)``
    and its own optimiser (AdamW with ``config.d_lr``, ``d_betas``, ``d_weight_decay`` over the
    discriminator's trainable parameters). Before ``start_step`` both losses are a constant
    0 and the discriminator is not run (skip the discriminator's backward/step then: the zero has
    no graph). The generator step back-propagates through the discriminator into its parameters
    too; zero the discriminator's gradients before its own backward (the usual ``zero_grad``).

    ``fake`` may be one image batch or the coarse-to-fine list a HieraTok returns. Only the finest
    scale is used, unless ``config.all_scales``: then every scale of at least ``config.min_size``
    px, at its own resolution (the PatchGAN is fully convolutional; no upsampling), with the mean
    over scales. ``real`` may be the matching list or the full-resolution batch, which is then
    area-downsampled to each scale (the paper's per-scale ground truth).

    Args:
        config: the :class:`GANConfig` (defaults to the paper's settings).
    """

    def __init__(self, config: Optional[GANConfig] = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else GANConfig()
        if config.discriminator == "dino":
            self.discriminator: nn.Module = DinoDiscriminator(config.dino_weights, config.dino_pretrained)
        else:
            self.discriminator = PatchDiscriminator(config.in_channels, config.ndf, config.n_layers, config.norm,
                                                    config.num_groups)
        self.lecam = LeCamEMA(config.lecam_decay) if config.lecam_weight > 0 else None
        if self.lecam is not None and config.lecam_form == "mean":
            self.lecam.initialized.fill_(True)  # the release's averages start at 0, decayed from the first step
        self._d_loss = _D_LOSSES[config.loss]
        self._g_loss = _G_LOSSES[config.loss]
        d_min = getattr(self.discriminator, "min_input_size", 1)
        if config.all_scales and config.min_size < d_min:
            raise ValueError(f"min_size {config.min_size} is below the discriminator's smallest input {d_min} px")

    def active(self, step: int) -> bool:
        """Whether the GAN losses are on at this global step (``step >= start_step``)."""
        return step >= self.config.start_step

    # ---- scale selection ----

    def _scale_indices(self, fakes: Sequence[torch.Tensor]) -> list[int]:
        if not self.config.all_scales:
            return [len(fakes) - 1]
        keep = [i for i, f in enumerate(fakes) if min(f.shape[-2:]) >= self.config.min_size]
        if not keep:
            sizes = [tuple(f.shape[-2:]) for f in fakes]
            raise ValueError(f"no scale reaches the GAN's min_size {self.config.min_size} px (scales {sizes})")
        return keep

    @staticmethod
    def _as_list(images: Images, what: str) -> list[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            images = [images]
        images = list(images)
        if not images or any(not isinstance(t, torch.Tensor) or t.ndim != 4 for t in images):
            raise ValueError(f"{what} must be a (B, C, H, W) tensor or a list of them")
        return images

    @staticmethod
    def _match_real(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The real batch at a fake scale's size: the reconstruction loss's target (area downsampling)."""
        if real.shape[-2] < fake.shape[-2] or real.shape[-1] < fake.shape[-1]:
            raise ValueError(f"real images {tuple(real.shape)} are smaller than the reconstruction {tuple(fake.shape)}")
        return scale_targets(real, [tuple(fake.shape[-2:])])[0]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.config.diffaug) if self.config.diffaug else x

    # ---- losses ----

    def generator_loss(
        self,
        fake: Images,
        step: int,
        *,
        rec_loss: Optional[torch.Tensor] = None,
        last_layer: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted adversarial loss of the generator (tokenizer).

        Args:
            fake: reconstructions in [-1, 1]: (B, 3, H, W) or the coarse-to-fine list.
            step: global step (the loss is 0 before ``config.start_step``).
            rec_loss: scalar reconstruction loss, needed with ``config.adaptive_weight``.
            last_layer: decoder output-layer weight, needed with ``config.adaptive_weight``.

        Returns:
            ``(loss, logs)``: ``loss`` = weight * g_loss (scalar; a constant 0 before the start);
            ``logs`` with detached ``g_loss`` (unweighted) and ``g_weight`` (the weight used).
        """
        fakes = self._as_list(fake, "fake")
        c = self.config
        if not self.active(step):
            zero = fakes[-1].new_zeros((), dtype=torch.float32)
            return zero, {"g_loss": zero, "g_weight": zero}
        idx = self._scale_indices(fakes)
        g_loss = torch.stack([self._g_loss(self.discriminator(self._augment(fakes[i])).float()) for i in idx]).mean()
        if c.adaptive_weight:
            if rec_loss is None or last_layer is None:
                raise ValueError("GANConfig.adaptive_weight needs rec_loss and last_layer in generator_loss")
            if torch.is_grad_enabled() and rec_loss.requires_grad and g_loss.requires_grad:
                weight = adaptive_gan_weight(rec_loss, g_loss, last_layer, max_weight=c.adaptive_max) * c.weight
            else:  # evaluation without a graph: report the loss with weight 0, as taming does
                weight = g_loss.new_zeros(())
        else:
            weight = g_loss.new_tensor(c.weight)
        return weight * g_loss, {"g_loss": g_loss.detach(), "g_weight": weight.detach()}

    def discriminator_loss(
        self, real: Images, fake: Images, step: int, *, discriminator: Optional[nn.Module] = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss on real images and (detached) reconstructions.

        Args:
            real: images in [-1, 1]: the full-resolution batch or a list matching ``fake``.
            fake: reconstructions in [-1, 1]: (B, 3, H, W) or the coarse-to-fine list.
            step: global step (the loss is 0 and the discriminator is not run before the start).
            discriminator: the module to call instead of ``self.discriminator`` (its DDP/FSDP
                wrapper in a distributed trainer, so that gradients are reduced).

        Returns:
            ``(loss, logs)``; ``logs`` holds detached ``d_loss`` (without LeCam), ``logits_real``
            and ``logits_fake`` (mean logits), ``d_accuracy`` (fraction of real logits > 0 and
            fake logits < 0, averaged over the two) and, with LeCam on, ``lecam``.
        """
        fakes = self._as_list(fake, "fake")
        reals = self._as_list(real, "real")
        if len(reals) not in (1, len(fakes)):
            raise ValueError(f"real has {len(reals)} scales but fake has {len(fakes)}; pass one batch or a matching list")
        if not self.active(step):
            zero = fakes[-1].new_zeros((), dtype=torch.float32)
            return zero, {"d_loss": zero, "logits_real": zero, "logits_fake": zero, "d_accuracy": zero}
        disc = self.discriminator if discriminator is None else discriminator
        d_losses, all_real, all_fake = [], [], []
        for i in self._scale_indices(fakes):
            f = fakes[i].detach()
            r = self._match_real(reals[i] if len(reals) > 1 else reals[0], f).detach()
            if r.shape != f.shape:
                raise ValueError(f"real {tuple(r.shape)} and fake {tuple(f.shape)} differ in shape")
            r, f = self._augment(r), self._augment(f)
            if self.config.norm == "batch" or self.config.discriminator == "dino":
                # batch statistics: separate passes as in taming / the release, each batch with its own
                lg_real, lg_fake = disc(r).float(), disc(f).float()
            else:  # per-sample norms: one pass over both halves gives the same logits, faster
                lg_real, lg_fake = disc(torch.cat([r, f])).float().chunk(2)
            d_losses.append(self._d_loss(lg_real, lg_fake))
            all_real.append(lg_real.flatten())
            all_fake.append(lg_fake.flatten())
        d_loss = torch.stack(d_losses).mean()
        logits_real, logits_fake = torch.cat(all_real), torch.cat(all_fake)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
            "d_accuracy": 0.5 * ((logits_real.detach() > 0).float().mean() + (logits_fake.detach() < 0).float().mean()),
        }
        loss = d_loss
        if self.lecam is not None:
            if self.config.lecam_form == "mean":  # ResTok's release: batch means, averages before the update
                reg = lecam_regularizer(logits_real.mean(), logits_fake.mean(), self.lecam.ema_real.clone(),
                                        self.lecam.ema_fake.clone())
                self.lecam.update(logits_real, logits_fake)
            else:  # Tseng et al.'s reference code: update first, every logit
                self.lecam.update(logits_real, logits_fake)
                reg = lecam_regularizer(logits_real, logits_fake, self.lecam.ema_real, self.lecam.ema_fake)
            loss = loss + self.config.lecam_weight * reg
            logs["lecam"] = reg.detach()
        return loss, logs

    def extra_repr(self) -> str:
        c = self.config
        return f"loss={c.loss}, weight={c.weight}, start_step={c.start_step}, all_scales={c.all_scales}"
