"""HieraTok: the multi-scale ViT KL tokenizer (arXiv HieraTok, sections 3.1-3.2, appendices C, E).

    image --ViT encoder--> posterior over z (B, d, G, G)          G = image_size / patch_size
    z --downsampler--> token maps z_s (B, d, s, s) for s in scales (coarse to fine)
    [z_s1 ; z_s2 ; ...] --ViT decoder, scale-causal mask--> one RGB image of side s*patch per scale

The single-scale twin is the same code with ``scales = [G]``: no downsampler, one decoder scale.
The latent a generator sees is ``z`` before downsampling (appendix C), so both twins give a
generator the same (B, d, G, G) latent.

Any image size (section "Any size" of the README): images whose sides are multiples of the patch
size give a (Gh, Gw) grid; the encoder's position table is resampled to it (bicubic, as timm), and
scale s of the training grid G becomes the (h, w) of :func:`scale_shapes` (the same fraction of each
side). The downsampler, the decoder's positions and the scale mask (blocks of h*w tokens, the same
rule) follow those shapes. At the training size nothing is resampled: the outputs are those of the
square model, bit for bit.

Legend: B batch, L tokens, D width, d latent channels, G full grid side, s a scale's side.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import require_positive_ints, runtime_field
from ..distributions import DiagonalGaussian
from ..hub import PretrainedMixin
from ..nn import (
    ATTENTION_BACKENDS,
    ATTENTION_MODES,
    LayerNorm2d,
    MaskSpec,
    MultiScalePosEmbed,
    PatchEmbed,
    Transformer,
    resample_grid,
    set_attention_backend,
    set_fast_paths,
    unpatchify,
)
from ..presets import HIERATOK_PRESETS
from .inputs import check_images

__all__ = ["HieraTokConfig", "HieraTok", "ConvDownsampler", "InterpDownsampler", "DOWNSAMPLERS",
           "area_downsample", "default_scales", "scale_shapes"]

DOWNSAMPLERS = ("conv", "conv-residual", "conv-prenorm", "interp")


def scale_shapes(scales: Sequence[int], grid: int, grid_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) of every scale for a (Gh, Gw) token grid: scale s of the G-grid covers the same
    fraction s / G of each side, ``(round(s * Gh / G), round(s * Gw / G))`` rounded half up and at
    least 1; ``(s, s)`` at the training grid. A ValueError when the grid is so small that two scales
    collapse to one token count (the pyramid would repeat a scale)."""
    gh, gw = grid_hw
    if gh < 1 or gw < 1:
        raise ValueError(f"token grid {gh}x{gw} is empty")
    shapes = [(max(1, (2 * s * gh + grid) // (2 * grid)), max(1, (2 * s * gw + grid) // (2 * grid))) for s in scales]
    areas = [h * w for h, w in shapes]
    if any(a >= b for a, b in zip(areas, areas[1:])):
        raise ValueError(f"token grid {gh}x{gw} is too small for scales {list(scales)} of grid {grid}: "
                         f"they collapse to {shapes}; use a larger image (the training grid {grid}x{grid} works)")
    return shapes


def default_scales(grid: int) -> tuple[int, ...]:
    """Powers of two up to the grid, ending at the grid: 16 -> (1, 2, 4, 8, 16), 12 -> (1, 2, 4, 8, 12)."""
    out, s = [], 1
    while s < grid:
        out.append(s)
        s *= 2
    return tuple(out) + (grid,)


@dataclass
class HieraTokConfig:
    """Architecture of a HieraTok tokenizer (defaults: the paper's f16d16 multi-scale model).

    ``scales`` are token-grid sides, coarse to fine, ending at ``image_size // patch_size``;
    ``None`` means :func:`default_scales` (or just the full grid when ``multiscale`` is False).
    Fields marked runtime (attention backend, drop-path) do not change the weights.
    """

    image_size: int = 256
    patch_size: int = 16
    in_channels: int = 3
    latent_channels: int = 16
    multiscale: bool = True
    scales: Optional[tuple[int, ...]] = None
    downsample: str = "conv-residual"  # one of DOWNSAMPLERS; chosen by the ablation in README "Downsampler designs"
    downsample_width: Optional[int] = None  # hidden width of the conv downsamplers; None = decoder_width
    attention: str = "scale_causal"  # "scale_causal" | "scale_independent" | "full"
    encoder_depth: int = 6
    encoder_width: int = 768
    encoder_heads: int = 12
    decoder_depth: int = 24
    decoder_width: int = 1024
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_bias: bool = False
    norm_eps: float = 1e-6
    init_std: float = runtime_field(0.02)  # only the initialisation: loaded weights do not depend on it
    encoder_drop_path: float = runtime_field(0.0)
    decoder_drop_path: float = runtime_field(0.1)
    attn_backend: str = runtime_field("sdpa")
    # per-channel mean / std of the latents z, measured by `hieratok cache-latents --update-tokenizer`:
    # no effect on the model; read by whoever normalises z (hieratok.interop.diffusers' scaling)
    latent_mean: Optional[tuple[float, ...]] = runtime_field(None)
    latent_std: Optional[tuple[float, ...]] = runtime_field(None)

    def __post_init__(self) -> None:
        require_positive_ints(self, ("image_size", "patch_size", "in_channels", "latent_channels", "encoder_depth",
                                     "encoder_width", "encoder_heads", "decoder_depth", "decoder_width", "decoder_heads"))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        g = self.grid
        if self.scales is None:
            self.scales = default_scales(g) if self.multiscale else (g,)
        if isinstance(self.scales, (str, bytes)) or not isinstance(self.scales, Sequence):
            raise ValueError(f"scales must be a list of grid sides, got {self.scales!r}")
        self.scales = tuple(self.scales)
        for s in self.scales:
            if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= g:
                raise ValueError(f"scale {s!r} is not a grid side between 1 and {g} (image_size {self.image_size} / patch {self.patch_size})")
        if any(a >= b for a, b in zip(self.scales, self.scales[1:])):
            raise ValueError(f"scales {list(self.scales)} must be strictly increasing")
        if self.scales[-1] != g:
            raise ValueError(f"scales {list(self.scales)} must end at the full grid {g} (image_size {self.image_size} / patch {self.patch_size})")
        if not self.multiscale and len(self.scales) > 1:
            raise ValueError(f"multiscale=False but scales {list(self.scales)} has {len(self.scales)} scales")
        self.multiscale = len(self.scales) > 1
        if self.downsample not in DOWNSAMPLERS:
            raise ValueError(f"downsample {self.downsample!r} is not one of {DOWNSAMPLERS}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_MODES}")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} is not one of {ATTENTION_BACKENDS}")
        for name, w, h in (("encoder", self.encoder_width, self.encoder_heads), ("decoder", self.decoder_width, self.decoder_heads)):
            if w % h:
                raise ValueError(f"{name}_width {w} is not divisible by {name}_heads {h}")
        if self.downsample_width is not None:
            require_positive_ints(self, ("downsample_width",))
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("encoder_drop_path", "decoder_drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if (self.latent_mean is None) != (self.latent_std is None):
            raise ValueError("give both latent_mean and latent_std, or neither")
        if self.latent_mean is not None:
            self.latent_mean, self.latent_std = tuple(map(float, self.latent_mean)), tuple(map(float, self.latent_std))
            for name, v in (("latent_mean", self.latent_mean), ("latent_std", self.latent_std)):
                if len(v) != self.latent_channels:
                    raise ValueError(f"{name} has {len(v)} values for {self.latent_channels} latent channels")
            if not all(math.isfinite(m) for m in self.latent_mean) or not all(0 < s < math.inf for s in self.latent_std):
                raise ValueError("latent_mean must be finite and latent_std finite and > 0")

    def unused_fields(self) -> tuple[str, ...]:
        """Fields without effect here (skipped by :func:`hieratok.config.architecture_diff`): a
        single-scale model has no downsampler and one attention pattern; area interpolation has no width."""
        if not self.multiscale:
            return ("downsample", "downsample_width", "attention")
        return ("downsample_width",) if self.downsample == "interp" else ()

    @property
    def grid(self) -> int:
        """Side G of the encoder's token grid."""
        return self.image_size // self.patch_size

    def scale_shapes(self, grid_hw: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
        """(h, w) of every scale for a token grid (default: the training grid); see :func:`scale_shapes`."""
        return scale_shapes(self.scales, self.grid, grid_hw or (self.grid, self.grid))

    @property
    def decoder_tokens(self) -> int:
        """Decoder sequence length, sum of s^2 (341 for [1, 2, 4, 8, 16])."""
        return sum(s * s for s in self.scales)

    @property
    def encoder_tokens(self) -> int:
        return self.grid * self.grid


def _strided_kernel(grid: int, side: int) -> tuple[int, int]:
    """(kernel, stride) of a valid conv mapping a grid x grid map to side x side.

    Integer ratios give non-overlapping kernel = stride = grid / side; other sides (e.g. 12 from 16)
    use stride floor(grid / side) and the kernel that makes the windows span the map exactly.
    """
    stride = grid // side
    return grid - (side - 1) * stride, stride


def area_downsample(z_BdGG: torch.Tensor, side: int | tuple[int, int]) -> torch.Tensor:
    """Area interpolation of a (B, d, Gh, Gw) map to ``side`` (an int for a square, or (h, w)); the
    identity at its own size."""
    hw = (side, side) if isinstance(side, int) else tuple(side)
    return z_BdGG if hw == tuple(z_BdGG.shape[-2:]) else F.interpolate(z_BdGG, size=hw, mode="area")


class _PreNormStack(nn.Module):
    """strided conv -> (+ 3x3 conv of GELU(LayerNorm(.))) -> 1x1 conv: the three convs of the
    paper's stack with the norm inside a residual branch, so the path strided conv -> 1x1 conv is
    linear and a token's magnitude reaches the output (the post-norm stack erases it). The branch's
    conv starts at zero, so the stack starts as a linear map of z."""

    def __init__(self, down: nn.Conv2d, mid: nn.Conv2d, out: nn.Conv2d, width: int, eps: float) -> None:
        super().__init__()
        self.down, self.norm, self.mid, self.out = down, LayerNorm2d(width, eps=eps), mid, out

    def forward(self, z_BdGG: torch.Tensor) -> torch.Tensor:
        h = self.down(z_BdGG)  # (B, W, s, s)
        return self.out(h + self.mid(F.gelu(self.norm(h))))  # (B, d, s, s)


class ConvDownsampler(nn.Module):
    """Learned multi-scale construction (HieraTok 3.2; appendix E: "three convolutional kernels per
    resolution", after ViTDet's simple feature pyramid).

    For every scale s, from the full latent map: a strided conv d -> W that brings G x G to s x s,
    a 3x3 conv W -> W, and a 1x1 conv W -> d. ``design`` places the rest:

    - ``"conv"`` (the paper read literally): LayerNorm2d + GELU after the first two convs. The
      LayerNorm right after a linear map of z makes each output token invariant to the magnitude of
      the latent around it, and the finest map starts as a random function of z, not z itself.
    - ``"conv-residual"``: the same stack added to the area interpolation of z, its last conv
      zero-initialised: training starts from ``interp`` (the finest map is z) and learns a correction.
    - ``"conv-prenorm"``: the norm moved into a zero-initialised residual branch
      (:class:`_PreNormStack`), so the stack has a linear path and keeps magnitudes.

    The model calls :meth:`init_branches` after its generic initialisation.

    Other grids: the strided conv of scale s (kernel k, stride t) maps a side of n = (h-1)*t + k to
    h; a (Gh, Gw) map whose sides are not that span (e.g. 12 columns for a 2-column scale with
    k = t = 8) is resampled to it first (antialiased bilinear). Sides that are multiples of G / s
    need no resampling.

    All three have the same convolutions: with the paper's f16d16 model at the decoder width W they
    add 52.9M parameters, putting the total at 399.4M against the paper's 401.18M (the single-scale
    twin is 346.5M vs 346.25M). The forward FLOPs come out 7.5% above the paper's (247.7 vs 230.45 G;
    single scale 184.7 vs 182.36 G): the paper does not say how it counted (README, "The model").
    """

    def __init__(self, latent_channels: int, width: int, grid: int, scales: Sequence[int], eps: float = 1e-6,
                 design: str = "conv") -> None:
        super().__init__()
        if design not in ("conv", "conv-residual", "conv-prenorm"):
            raise ValueError(f"conv downsampler design {design!r} is not one of conv, conv-residual, conv-prenorm")
        self.scales, self.design = tuple(scales), design
        self.kernels = [_strided_kernel(grid, s) for s in self.scales]
        stacks: list[nn.Module] = []
        for s, (k, t) in zip(self.scales, self.kernels):
            down = nn.Conv2d(latent_channels, width, kernel_size=k, stride=t)
            mid = nn.Conv2d(width, width, kernel_size=3, padding=1)
            out = nn.Conv2d(width, latent_channels, kernel_size=1)
            if design == "conv-prenorm":
                stacks.append(_PreNormStack(down, mid, out, width, eps))
            else:
                stacks.append(nn.Sequential(down, LayerNorm2d(width, eps=eps), nn.GELU(),
                                            mid, LayerNorm2d(width, eps=eps), nn.GELU(), out))
        self.stacks = nn.ModuleList(stacks)

    @torch.no_grad()
    def init_branches(self) -> None:
        """Zero the convs that make ``conv-residual`` start as area interpolation (the last conv of
        every stack) and ``conv-prenorm`` as a linear map (its residual branch's 3x3 conv)."""
        for st in self.stacks:
            conv = {"conv-residual": st[-1] if isinstance(st, nn.Sequential) else None,
                    "conv-prenorm": getattr(st, "mid", None)}.get(self.design)
            if conv is not None:
                conv.weight.zero_()
                conv.bias.zero_()

    def forward(self, z_BdGG: torch.Tensor, shapes: Optional[Sequence[tuple[int, int]]] = None) -> list[torch.Tensor]:
        """Token maps, coarse to fine, each (B, d, h, w) for ``shapes`` (default: (s, s) per scale)."""
        shapes = [(s, s) for s in self.scales] if shapes is None else shapes
        maps = []
        for stack, (k, t), (h, w) in zip(self.stacks, self.kernels, shapes):
            span = ((h - 1) * t + k, (w - 1) * t + k)  # the input sides this conv maps to (h, w)
            z = z_BdGG if span == tuple(z_BdGG.shape[-2:]) else F.interpolate(
                z_BdGG, size=span, mode="bilinear", align_corners=False, antialias=True)
            maps.append(stack(z))  # (B, d, h, w)
        if self.design == "conv-residual":
            maps = [area_downsample(z_BdGG, hw) + m for hw, m in zip(shapes, maps)]
        return maps


class InterpDownsampler(nn.Module):
    """Parameter-free multi-scale construction: area interpolation of z to every scale."""

    def __init__(self, scales: Sequence[int]) -> None:
        super().__init__()
        self.scales = tuple(scales)

    def forward(self, z_BdGG: torch.Tensor, shapes: Optional[Sequence[tuple[int, int]]] = None) -> list[torch.Tensor]:
        return [area_downsample(z_BdGG, hw) for hw in (shapes or self.scales)]


class Encoder(nn.Module):
    """ViT encoder: conv patch embed + learnable absolute positions, pre-norm blocks, head to 2d."""

    def __init__(self, cfg: HieraTokConfig) -> None:
        super().__init__()
        D = cfg.encoder_width
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.encoder_tokens, D))
        self.blocks = Transformer(cfg.encoder_depth, D, cfg.encoder_heads, cfg.mlp_ratio, cfg.qkv_bias,
                                  cfg.mlp_bias, cfg.encoder_drop_path, cfg.norm_eps, cfg.attn_backend)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, 2 * cfg.latent_channels)
        self.grid, self.patch_size, self.out_channels = cfg.grid, cfg.patch_size, 2 * cfg.latent_channels

    def pos_for(self, gh: int, gw: int) -> torch.Tensor:
        """The (1, gh*gw, D) position table of a gh x gw grid: the learned one at the training grid,
        else that one resampled (bicubic, timm's dynamic image size)."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        G, D = self.grid, self.pos_embed.shape[-1]
        table = self.pos_embed.transpose(1, 2).reshape(1, D, G, G)
        return resample_grid(table, (gh, gw)).flatten(2).transpose(1, 2)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        gh, gw = x_BCHW.shape[-2] // self.patch_size, x_BCHW.shape[-1] // self.patch_size
        x_BLD = self.patch_embed(x_BCHW) + self.pos_for(gh, gw)
        h = self.head(self.norm(self.blocks(x_BLD)))  # (B, gh*gw, 2d)
        return h.transpose(1, 2).reshape(h.shape[0], self.out_channels, gh, gw)  # (B, 2d, Gh, Gw)


class Decoder(nn.Module):
    """ViT decoder over the coarse-to-fine token sequence with a scale mask, one pixel head for all scales."""

    def __init__(self, cfg: HieraTokConfig) -> None:
        super().__init__()
        D = cfg.decoder_width
        self.scales, self.patch_size, self.out_channels = cfg.scales, cfg.patch_size, cfg.in_channels
        self.attention = cfg.attention if len(cfg.scales) > 1 else "full"
        self.proj_in = nn.Linear(cfg.latent_channels, D)
        self.pos = MultiScalePosEmbed(cfg.grid, D, cfg.scales, cfg.init_std)
        self.blocks = Transformer(cfg.decoder_depth, D, cfg.decoder_heads, cfg.mlp_ratio, cfg.qkv_bias,
                                  cfg.mlp_bias, cfg.decoder_drop_path, cfg.norm_eps, cfg.attn_backend)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.patch_size * cfg.patch_size * cfg.in_channels)
        self.mask = MaskSpec.for_scales(self.attention, cfg.scales)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [tuple(m.shape[-2:]) for m in maps]
        native = shapes == [(s, s) for s in self.scales]
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]  # each (B, h*w, d)
        x_BLD = self.proj_in(torch.cat(tokens, dim=1)) + (self.pos() if native else self.pos(shapes))
        mask = self.mask if native else MaskSpec.for_scales(self.attention, shapes)  # blocks of h*w, same rule
        x_BLD = self.head(self.norm(self.blocks(x_BLD, mask)))  # (B, L, p*p*3)
        out, start = [], 0
        for h, w in shapes:
            out.append(unpatchify(x_BLD[:, start:start + h * w], (h, w), self.patch_size, self.out_channels))
            start += h * w
        return out


class HieraTok(PretrainedMixin, nn.Module):
    """Multi-scale ViT KL tokenizer; with ``scales=[G]`` the single-scale twin.

    Example:
        >>> m = HieraTok.from_preset("tiny")
        >>> z = m.encode(x).mode()              # (B, d, G, G)
        >>> pyr = m.decode(z, all_scales=True)  # coarse -> fine images
    """

    config_class: ClassVar[type] = HieraTokConfig
    model_type: ClassVar[str] = "hieratok"
    presets = HIERATOK_PRESETS

    def __init__(self, config: HieraTokConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        if not config.multiscale:
            self.downsampler: Optional[nn.Module] = None
        elif config.downsample == "interp":
            self.downsampler = InterpDownsampler(config.scales)
        else:
            width = config.decoder_width if config.downsample_width is None else config.downsample_width
            self.downsampler = ConvDownsampler(config.latent_channels, width, config.grid, config.scales,
                                               config.norm_eps, design=config.downsample)
        self.decoder = Decoder(config)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.encoder.pos_embed, std=config.init_std)
        if isinstance(self.downsampler, ConvDownsampler):
            self.downsampler.init_branches()

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- construction -------------------------------------------------------------------------

    def set_attn_backend(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` ("sdpa", "reference" or "flex")."""
        self.config = dataclasses.replace(self.config, attn_backend=backend)  # checks the name
        set_attention_backend(self, backend)

    def set_fast_paths(self, enabled: bool = True) -> None:
        """Switch the inference fast paths (segmented scale masks, in-place GELU) on (default) or to
        their reference paths."""
        set_fast_paths(self, enabled)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute transformer blocks in the backward pass (less memory, same gradients)."""
        self.encoder.blocks.grad_checkpointing = enabled
        self.decoder.blocks.grad_checkpointing = enabled

    # ---- API ----------------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        c = self.config
        check_images(x, c.in_channels, None, self.training, c.patch_size)

    def check_image_size(self, height: int, width: int) -> None:
        """A ValueError for an image size this model cannot encode (sides not multiples of the patch,
        or too small for the pyramid)."""
        self.output_shapes(height, width)

    def output_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(height, width) in pixels of every output scale for an input of ``height`` x ``width``."""
        p = self.config.patch_size
        if height % p or width % p or height < p or width < p:
            raise ValueError(f"image size {height}x{width} does not work: sides must be positive multiples of the patch size {p}")
        return [(h * p, w * p) for h, w in self.config.scale_shapes((height // p, width // p))]

    def encode(self, x_BCHW: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] of any (H, W) that are multiples of the patch size -> diagonal Gaussian
        posterior over z (B, d, H/p, W/p)."""
        self._check_images(x_BCHW)
        return DiagonalGaussian(self.encoder(x_BCHW))

    def multiscale_maps(self, z_BdGG: torch.Tensor) -> list[torch.Tensor]:
        """The token maps the decoder reads, coarse to fine, each (B, d, s, s) (each (B, d, h, w) of
        :func:`scale_shapes` for a latent of another grid)."""
        c = self.config
        if z_BdGG.ndim != 4 or z_BdGG.shape[1] != c.latent_channels:
            raise ValueError(f"expected latents of shape (B, {c.latent_channels}, Gh, Gw) (training grid "
                             f"{c.grid}x{c.grid}), got {tuple(z_BdGG.shape)}")
        shapes = c.scale_shapes(tuple(z_BdGG.shape[-2:]))
        return [z_BdGG] if self.downsampler is None else self.downsampler(z_BdGG, shapes)

    def decode_multiscale(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decode token maps (coarse to fine) -> images (B, 3, h*p, w*p) per scale (s*p square at the
        training grid); the finest map's grid sets every scale's shape (:func:`scale_shapes`)."""
        c = self.config
        if len(maps) != len(c.scales):
            raise ValueError(f"expected {len(c.scales)} token maps for scales {list(c.scales)}, got {len(maps)}")
        if maps[-1].ndim != 4:
            raise ValueError(f"token maps must be (B, {c.latent_channels}, h, w), got {tuple(maps[-1].shape)}")
        for m, s, (h, w) in zip(maps, c.scales, c.scale_shapes(tuple(maps[-1].shape[-2:]))):
            if m.ndim != 4 or tuple(m.shape[1:]) != (c.latent_channels, h, w):
                raise ValueError(f"token map for scale {s} must be (B, {c.latent_channels}, {h}, {w}), got {tuple(m.shape)}")
        return self.decoder(maps)

    def decode(self, z_BdGG: torch.Tensor, all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Latent -> finest image (B, 3, H, W), or the whole pyramid (coarse to fine) if ``all_scales``."""
        pyr = self.decode_multiscale(self.multiscale_maps(z_BdGG))
        return pyr if all_scales else pyr[-1]

    # ---- the Tokenizer interface (tokenizers/base.py) ----
    codebook_size = None  # continuous latents

    def output_sides(self) -> list[int]:
        return [s * self.config.patch_size for s in self.config.scales]

    def tokenize(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """The posterior mode (B, d, G, G): what a latent generator (DiT) models."""
        return self.encode(x_BCHW).mode()

    def detokenize(self, z_BdGG: torch.Tensor, all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        return self.decode(z_BdGG.to(self.last_layer().dtype), all_scales=all_scales)

    def reconstruct(self, x_BCHW: torch.Tensor) -> tuple[list[torch.Tensor], None]:
        return self.decode(self.tokenize(x_BCHW), all_scales=True), None

    def last_layer(self) -> torch.Tensor:
        return self.decoder.head.weight

    def no_weight_decay(self) -> set[str]:
        """The encoder's positions and the decoder's position and scale embeddings."""
        keep = {id(self.encoder.pos_embed), *(id(p) for p in self.decoder.pos.parameters())}
        return {n for n, p in self.named_parameters() if id(p) in keep}

    def forward(
        self,
        x_BCHW: torch.Tensor,
        sample_posterior: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, Any]:
        """Encode, (sample,) decode every scale.

        Returns:
            ``{"reconstructions": [coarse .. fine images], "posterior": DiagonalGaussian, "latent": z}``.
            The posterior is sampled in training mode and its mode used in eval mode, unless
            ``sample_posterior`` says otherwise.
        """
        post = self.encode(x_BCHW)
        sample = self.training if sample_posterior is None else sample_posterior
        z = post.sample(generator) if sample else post.mode()
        return {"reconstructions": self.decode(z, all_scales=True), "posterior": post, "latent": z}
