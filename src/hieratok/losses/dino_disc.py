"""The DINO discriminator and DiffAugment of ResTok's release (VAR / StyleGAN-T style).

    image [-1, 1] --ImageNet norm, 224 px (random crop or resize)--> frozen DINO ViT-S/16
        token maps after the patch embedding and after blocks 2, 5, 8, 11 (patch tokens + class token)
        --> one trainable 1D-conv head each: [conv k=1, BN, LReLU] -> residual [conv k=9, BN, LReLU] -> conv k=1 -> 1
    logits (B, 5 * 196): one per token and head

* The backbone is DINO's ViT-S/16 (``dino_deitsmall16_pretrain.pth``, timm's key names); its
  weights never train. They come from a path, ``$HIERATOK_DINO_WEIGHTS`` or the torch hub cache
  (:func:`find_dino_weights`); nothing is downloaded. Without them the discriminator is not built
  (a one-line error names the file); ``pretrained=False`` builds a random backbone on purpose
  (tests only, logged).
* Heads: circular padding, spectral-normalised convolutions, batch norm over virtual batches of 8
  samples (statistics of the current batch also at evaluation, as released), LeakyReLU(0.2), the
  residual branch scaled by 1/sqrt(2).
* :func:`diff_augment` (Zhao et al. 2020): per policy group with probability 0.5, colour
  (brightness, saturation, contrast), translation (up to 1/8 of the side, zero padding) and
  cutout (a square of 0.2 of the side), each drawn per sample; the release applies
  ``"color,translation,cutout_0.2"`` to reals and reconstructions before this discriminator.
  Augmentations act on [0, 1] pixel values, as released.

Legend: B batch, C channels, L tokens, H height, W width.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..hub import check_state_dict
from ..nn.transformer import Block
from ..weights import resolve_weights
from .perceptual import load_weight_file

__all__ = ["DinoDiscriminator", "FrozenDinoViT", "diff_augment", "diffaug_groups", "find_dino_weights", "DINO_FILE",
           "DIFFAUG_POLICY"]

log = logging.getLogger(__name__)

DINO_FILE = "dino_deitsmall16_pretrain.pth"
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/" + DINO_FILE
DIFFAUG_POLICY = "color,translation,cutout_0.2"
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def find_dino_weights(path: Optional[str] = None) -> Path:
    """The DINO ViT-S/16 checkpoint: ``path``, else ``$HIERATOK_DINO_WEIGHTS``, else the torch hub cache.

    Raises:
        MissingWeightsError: an explicit ``path`` or the variable names no file, or no source has it.
    """
    return resolve_weights("DINO", DINO_FILE, user_path=path,
                           without_it=f"download it from {DINO_URL}, or use gan.discriminator=patch").path


class FrozenDinoViT(nn.Module):
    """DINO's ViT (default ViT-S/16 at 224 px) returning the token maps the heads read, (B, C, L) each."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 16, img_size: int = 224,
                 key_depths: Sequence[int] = (2, 5, 8, 11), eps: float = 1e-6) -> None:
        super().__init__()
        if not key_depths or max(key_depths) >= depth:
            raise ValueError(f"key_depths {tuple(key_depths)} must be blocks of the {depth}-block backbone")
        self.img_size, self.key_depths = img_size, tuple(key_depths)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        # the toolkit's ViT block has timm's parameter names (qkv and MLP with biases)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, mlp_bias=True, norm_eps=eps)
                                    for _ in range(max(key_depths) + 1))
        self.requires_grad_(False)

    def forward(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """ImageNet-normalised 224 px images -> [embedding, block outputs at key depths], (B, C, L)."""
        x = self.patch_embed.proj(x_BCHW).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        readout = [x[:, 1:] + x[:, :1]]  # patch tokens plus the class token
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.key_depths:
                readout.append(x[:, 1:] + x[:, :1])
        return [r.transpose(1, 2) for r in readout]


class _VirtualBatchNorm1d(nn.Module):
    """Batch norm over ``ceil(B / virtual_bs)`` groups of consecutive samples (statistics over the
    group's samples and tokens), always with the current batch's statistics.

    As released, the groups are equal when they can be (B = 12: two groups of 6); otherwise their
    sizes differ by one (B = 9: 5 and 4), where the release's ``view`` fails.
    """

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x_BCL: torch.Tensor) -> torch.Tensor:
        parts = []
        for x in x_BCL.float().tensor_split(math.ceil(x_BCL.shape[0] / self.virtual_bs)):
            var, mean = torch.var_mean(x, dim=(0, 2), keepdim=True, correction=0)
            parts.append((x - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(parts) * self.weight[:, None] + self.bias[:, None]


def _conv_bn_lrelu(channels: int, kernel: int, virtual_bs: int) -> nn.Sequential:
    conv = spectral_norm(nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular"))
    return nn.Sequential(conv, _VirtualBatchNorm1d(channels, virtual_bs), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2.0)


class DinoDiscriminator(nn.Module):
    """Frozen DINO features + trainable 1D-conv heads (see the module docstring); images in [-1, 1].

    Args:
        weights: DINO checkpoint path (else ``$HIERATOK_DINO_WEIGHTS`` / the torch hub cache).
        pretrained: False builds a randomly initialised backbone on purpose (tests, smoke runs).
        kernel_size, virtual_bs: of the heads.
        backbone: :class:`FrozenDinoViT` keyword arguments (a smaller one for tests).
    """

    def __init__(self, weights: Optional[str] = None, pretrained: bool = True, kernel_size: int = 9,
                 virtual_bs: int = 8, **backbone: object) -> None:
        super().__init__()
        self.backbone = FrozenDinoViT(**backbone)  # type: ignore[arg-type]
        if pretrained:
            path = find_dino_weights(weights)
            want = self.backbone.state_dict()
            # DINO's file also holds the final norm, the head and the blocks past the last key depth
            sd = {k: v for k, v in load_weight_file(path).items()
                  if k in want or not k.startswith(("head", "norm.", "blocks."))}
            check_state_dict(self.backbone, sd, f"{path} (DINO ViT backbone)")
            self.backbone.load_state_dict(sd)
        else:
            log.warning("DINO discriminator backbone randomly initialised (pretrained=False): a smoke test only")
        self.backbone.eval()
        C = self.backbone.cls_token.shape[-1]
        self.heads = nn.ModuleList(
            nn.Sequential(_conv_bn_lrelu(C, 1, virtual_bs), _Residual(_conv_bn_lrelu(C, kernel_size, virtual_bs)),
                          spectral_norm(nn.Conv1d(C, 1, 1)))
            for _ in range(len(self.backbone.key_depths) + 1))
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def requires_grad_(self, requires_grad: bool = True) -> "DinoDiscriminator":
        super().requires_grad_(requires_grad)
        self.backbone.requires_grad_(False)  # frozen whatever a trainer toggles
        return self

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()  # frozen: always in evaluation mode
        return self

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.backbone.img_size
        H, W = x.shape[-2:]
        if self.training and H > s and W > s and bool(torch.rand(()) <= 0.5):  # a random 224 crop, half the time
            top, left = int(torch.randint(H - s + 1, ())), int(torch.randint(W - s + 1, ()))
            return x[..., top:top + s, left:left + s]
        if (H, W) == (s, s):
            return x
        return F.interpolate(x, size=(s, s), mode="area" if H > s else "bicubic")

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x = ((x_BCHW.float() + 1) / 2 - self.mean) / self.std
        maps = self.backbone(self._resize(x))
        return torch.cat([head(m).flatten(1) for head, m in zip(self.heads, maps)], dim=1)  # (B, heads * L)


# --------------------------------------------------------------------------------------------
# DiffAugment
# --------------------------------------------------------------------------------------------


def _per_sample(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One uniform number per sample, (B, 1, 1, 1), drawn on the CPU like every draw here."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=generator).to(x.device, x.dtype)


def _color(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
    x = x + (_per_sample(x, g) - 0.5)  # brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_per_sample(x, g) * 2) + m  # saturation
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_per_sample(x, g) + 0.5) + m  # contrast


def _translation(x: torch.Tensor, g: Optional[torch.Generator], ratio: float = 0.125) -> torch.Tensor:
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (B, 1, 1), generator=g).to(x.device)
    dx = torch.randint(-sw, sw + 1, (B, 1, 1), generator=g).to(x.device)
    rows = (torch.arange(H, device=x.device)[None, :, None] + dy + 1).clamp(0, H + 1)  # index into the padded map
    cols = (torch.arange(W, device=x.device)[None, None, :] + dx + 1).clamp(0, W + 1)
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H+2, W+2, C), zero border
    return padded[torch.arange(B, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, g: Optional[torch.Generator], ratio: float) -> torch.Tensor:
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    cy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), generator=g).to(x.device)
    cx = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), generator=g).to(x.device)
    ys = torch.arange(H, device=x.device)[None, :, None]
    xs = torch.arange(W, device=x.device)[None, None, :]
    inside = (ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch) & (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw)
    return x * (~inside)[:, None].to(x.dtype)


def diffaug_groups(policy: str) -> list[Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]]:
    """The augmentation of each comma-separated group of a DiffAugment policy (ValueError on unknown ones)."""
    fns = []
    for group in filter(None, policy.split(",")):
        if group == "color":
            fns.append(_color)
        elif group == "translation":
            fns.append(_translation)
        elif group == "cutout" or group.startswith("cutout_"):
            ratio = 0.5 if group == "cutout" else float(group.split("_", 1)[1])
            fns.append(partial(_cutout, ratio=ratio))
        else:
            raise ValueError(f"unknown DiffAugment group {group!r} (color, translation, cutout, cutout_R)")
    return fns


def diff_augment(x_BCHW: torch.Tensor, policy: str = DIFFAUG_POLICY, prob: float = 0.5,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DiffAugment of images in [-1, 1] (differentiable; see the module docstring).

    ``policy``: comma-separated groups from ``color``, ``translation``, ``cutout`` (0.5 of the side)
    and ``cutout_R`` (R of the side); each group is applied with probability ``prob``.
    ``generator``: a CPU generator (or None: the global one); every random number is drawn on
    the CPU and moved to the input's device, so a seed gives the same augmentation on any device.
    """
    fns = diffaug_groups(policy)
    if not fns:
        return x_BCHW
    x = (x_BCHW + 1) / 2
    for fn in fns:
        if float(torch.rand((), generator=generator)) <= prob:
            x = fn(x, generator)
    return x * 2 - 1
