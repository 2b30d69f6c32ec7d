"""ResTok: a 1D VQ tokenizer with hierarchical residuals (Zhang et al. 2026, arXiv 2601.03955).

    image --CNN--> (B, Z, G, G) --1x1--> image tokens (B, G*G, D)
                                      \\--residual latent init (Alg. 1)--> latent tokens (B, N, D)
    [image tokens ; latent tokens] --ViT encoder, hierarchical merging + level-causal mask-->
    latent tokens --per-level linear--> (B, N, d) --VQ--> codes (B, N)
    codes --per-level linear--> [latents ; G*G image queries] --ViT decoder--> (B, Z, G, G) --CNN--> image

* Hierarchical merging (sec. 3.2): after the attention of layers ``int(i/S * depth) - 1``
  (i = 1..S-1; 5, 11, 17 for 24 layers and S = 4 stages) the current coarsest image tokens are
  pooled 2x along the row-major sequence (nearest, i.e. every second token: a G x w grid
  becomes G x w/2) and placed *before* the finer tokens; with residual image tokens the finer
  tokens become ``fine - upsample(coarse)``. Each new stage gets a learned stage embedding.
  With factor-2 nearest pooling the kept tokens' residual is exactly zero, so a finer stage
  carries the odd-column differences (what the released model computes).
* Encoder mask: consecutive blocks ``[image stages coarse..fine, latent levels]`` with
  ``allowed(q, k) = block(q) >= block(k)`` (:func:`hieratok.nn.masks.block_causal_mask`).
  Latent levels have sizes ``[1, 1, 2, 4, ..., N/2]``.
* Residual latent initialisation (Alg. 1, :func:`residual_latent_init`): per level, area-pool
  the remainder to the level's grid ((1,1), (1,1), (1,2), (2,2), (2,4), ...), emit those
  tokens, subtract their nearest upsampling from the remainder.
* Positions: 2D RoPE on q/k (row on the first half of each head, column on the second); the
  encoder lays out its image stages coarse-first (grids G x G/2^s) and the latent tokens after
  them with 1D positions repeated on both axes; the decoder puts the latents first.
* Nested dropout (training): a kept prefix length is drawn per sample from
  ``[min_latent_tokens, 2 min, ..., N]`` with weights ``2^i`` and the full length up-weighted
  so that ``P(drop) = nested_dropout_prob``; the tail is replaced by a learned mask code
  before the decoder's per-level input projections.
* ``legacy_latent_layout`` (the release): the encoder output (B, N, D) is reinterpreted with a
  raw ``reshape(B, D, N)`` before the per-level 1x1 projections (a TiTok legacy): latent n's
  code is then a linear map of ``D`` values gathered from all N tokens. With it off, latent
  n's code depends on token n only and the code hierarchy is strictly level-causal.

Fast paths (inference speed on CPU; each has a switch giving its reference path, and
:meth:`ResTok.set_fast_paths` flips them all; parity: tests/restok/test_restok_fast_paths.py):

* encoder attention: the level-causal mask is run as a
  :class:`~hieratok.nn.attention.SegmentedMask` (SDPA per run of query blocks over the key
  prefix they see; no masked-out block is computed), ``_Stack.segment_masks``;
* RoPE as a complex multiply (:func:`hieratok.nn.rope.apply_rope`), ``RoPEAttention.fast_rope``;
* the CNN front / back end's fast paths (:mod:`hieratok.nn.conv_autoencoder`: channels-last on
  CPU, in-place activations without autograd, conv + residual as one oneDNN call, upsample + conv
  at the low resolution) and the in-place, row-chunked MLP of :class:`hieratok.nn.vit.Mlp`;
* the last layer computes only the rows that are read afterwards (``_Stack.last_layer_needed_rows``):
  the decoder's image rows, and the encoder's latent rows when no image tokens are asked for
  (:meth:`ResTok.encode_indices`; image tokens never attend to latents).

Images are in [-1, 1] (the library convention); internally they are mapped to [0, 1] and
ImageNet-normalised, and the decoder's [0, 1] output is mapped back, so released weights
behave as trained.

Legend: B batch, L sequence, D width, Z CNN map channels, G token-grid side, N latent tokens,
d code dim, K head dim, A alignment feature width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import require_positive_ints, runtime_field
from ..hub import PretrainedMixin
from ..nn.attention import ATTENTION_BACKENDS, MaskLike, attention, segment_mask
from ..nn.conv_autoencoder import ConvDecoder, ConvEncoder, ConvResBlock
from ..nn.masks import block_causal_mask, block_causal_mask_mod
from ..nn.rope import apply_rope, apply_rope_reference, mixed_positions, rope_table
from ..nn.vit import Mlp
from ..presets import RESTOK_PRESETS
from ..quantizers.vq import VectorQuantizer
from .inputs import check_images

__all__ = [
    "ResTokConfig", "ResTok",
    "residual_latent_init", "latent_levels_to_map", "merge_image_tokens", "latent_level_sizes",
    "level_pooling_grid", "nested_dropout_choices",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KeepLike = Union[None, int, torch.Tensor]


# --------------------------------------------------------------------------------------------
# hierarchy bookkeeping (pure functions, tested on their own)
# --------------------------------------------------------------------------------------------


def latent_level_sizes(num_tokens: int) -> list[int]:
    """Sizes of the latent levels, ``[1, 1, 2, 4, ..., N/2]`` (sum N) for a power of two N >= 2."""
    if num_tokens < 2 or num_tokens & (num_tokens - 1):
        raise ValueError(f"num_latent_tokens must be a power of two >= 2, got {num_tokens}")
    return [1] + [2 ** k for k in range(int(math.log2(num_tokens)))]


def level_pooling_grid(n: int) -> tuple[int, int]:
    """(h, w) grid a level of n = 2^k tokens is pooled to: width doubles first, then height.

    1 -> (1, 1), 2 -> (1, 2), 4 -> (2, 2), 8 -> (2, 4), ..., 64 -> (8, 8), 128 -> (8, 16).
    """
    k = int(math.log2(n))
    if 2 ** k != n:
        raise ValueError(f"level size must be a power of two, got {n}")
    return 2 ** (k // 2), 2 ** (k - k // 2)


def nested_dropout_choices(num_tokens: int, min_tokens: int, drop_prob: float) -> tuple[list[int], list[float]]:
    """Kept prefix lengths ``[min, 2 min, ..., N]`` and their probabilities.

    Shorter prefixes get weights ``2^i`` (i = 0, 1, ...); the full length gets
    ``sum(shorter) * (1 - p) / p`` so that a sample is dropped with probability ``p``
    (the release's p = 0.2 gives [4, 8, 16, 32, 64, 128] with weights [1, 2, 4, 8, 16, 124]).
    """
    lengths = [n for n in (2 ** k for k in range(int(math.log2(num_tokens)) + 1)) if n >= min_tokens]
    short = [2.0 ** i for i in range(len(lengths) - 1)]
    if not short or drop_prob <= 0:
        return [num_tokens], [1.0]
    if drop_prob >= 1:
        raise ValueError(f"nested_dropout_prob must be < 1, got {drop_prob}")
    w = short + [sum(short) * (1.0 - drop_prob) / drop_prob]
    return lengths, [x / sum(w) for x in w]


def residual_latent_init(x_BCHW: torch.Tensor, grids: Sequence[tuple[int, int]], residual: bool = True) -> torch.Tensor:
    """Residual 1D latent-token initialisation (ResTok Algorithm 1).

    For each grid (h, w) in order: area-pool the remainder ``r`` to (h, w), emit the h*w tokens
    (row-major), and with ``residual`` set ``r <- r - nearest_upsample(tokens)``. The remainder
    starts as ``x``. Without ``residual`` every level pools ``x`` itself.

    Args:
        x_BCHW: feature map (B, C, H, W).
        grids: per-level pooling grids, e.g. ``[(1, 1), (1, 1), (1, 2), (2, 2), ...]``.
        residual: subtract each level from the remainder.

    Returns:
        (B, sum h*w, C) latent tokens, levels concatenated in order.
    """
    H, W = x_BCHW.shape[-2:]
    rest, out = x_BCHW, []
    for h, w in grids:
        t_BChw = F.interpolate(rest, size=(h, w), mode="area")
        out.append(t_BChw.flatten(2).transpose(1, 2))
        if residual:
            rest = rest - F.interpolate(t_BChw, size=(H, W), mode="nearest")
    return torch.cat(out, dim=1)


def latent_levels_to_map(tokens_BNC: torch.Tensor, grids: Sequence[tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
    """Sum of the nearest-upsampled level maps (B, C, *size): undoes :func:`residual_latent_init`.

    With ``residual=True`` and ``size`` the finest level grid, the result equals ``x`` area-pooled
    to that grid (the residuals telescope).
    """
    out, start = None, 0
    for h, w in grids:
        t = tokens_BNC[:, start:start + h * w].transpose(1, 2).reshape(tokens_BNC.shape[0], -1, h, w)
        up = F.interpolate(t, size=size, mode="nearest")
        out = up if out is None else out + up
        start += h * w
    if start != tokens_BNC.shape[1]:
        raise ValueError(f"grids cover {start} tokens but {tokens_BNC.shape[1]} were given")
    return out


def merge_image_tokens(x_BLD: torch.Tensor, num_image: int, residual: bool = True) -> torch.Tensor:
    """Hierarchical merging (sec. 3.2) of the leading ``num_image`` tokens (the current coarsest stage).

    ``coarse = x[:, 0:num_image:2]`` (2x nearest pooling of the row-major sequence: a G x w grid
    becomes G x w/2), ``fine = x[:, :num_image] - repeat(coarse, 2)`` with ``residual``;
    returns ``[coarse ; fine ; x[:, num_image:]]``.
    """
    if num_image % 2:
        raise ValueError(f"cannot halve {num_image} image tokens")
    img = x_BLD[:, :num_image]
    coarse = img[:, 0::2]
    fine = img - coarse.repeat_interleave(2, dim=1) if residual else img
    return torch.cat((coarse, fine, x_BLD[:, num_image:]), dim=1)


# --------------------------------------------------------------------------------------------
# config and presets
# --------------------------------------------------------------------------------------------


@dataclass
class ResTokConfig:
    """Architecture of a ResTok tokenizer (defaults: the released ``restok_l_128``).

    Attributes:
        image_size: input side (square images).
        cnn_channels, cnn_channel_mult, cnn_res_blocks, cnn_z_channels, cnn_groups: the MaskGIT
            CNN front/back end (:mod:`hieratok.nn.conv_autoencoder`); its stride is
            ``2^(len(cnn_channel_mult) - 1)`` and gives the token grid G.
        encoder_*/decoder_*: ViT width, depth, heads (head dim divisible by 4 for 2D RoPE).
        hierarchy_stages: S image stages (S - 1 merging layers).
        residual_image_tokens / residual_latent_tokens: the two residual priors.
        num_latent_tokens: N (power of two), levels ``[1, 1, 2, ..., N/2]``.
        min_latent_tokens: shortest prefix nested dropout keeps (4).
        codebook_size, codebook_dim, l2_normalized_codes: the VQ codebook (8192 x 8, l2).
        legacy_latent_layout: the release's raw-reshape before the per-level projections.
        rope_theta: RoPE base.
        alignment_dim: A, width of the foundation features the alignment heads project to.
        encoder_alignment / decoder_alignment: build the alignment heads (and the decoder's
            parallel alignment queries); the released training run had both.
        commitment_beta, nested_dropout_prob, attn_backend: runtime fields (no weights).
    """

    image_size: int = 256
    cnn_channels: int = 128
    cnn_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    cnn_res_blocks: int = 2
    cnn_z_channels: int = 256
    cnn_groups: int = 32
    encoder_width: int = 1024
    encoder_depth: int = 24
    encoder_heads: int = 16
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    hierarchy_stages: int = 4
    residual_image_tokens: bool = True
    residual_latent_tokens: bool = True
    num_latent_tokens: int = 128
    min_latent_tokens: int = 4
    codebook_size: int = 8192
    codebook_dim: int = 8
    l2_normalized_codes: bool = True
    legacy_latent_layout: bool = True
    rope_theta: float = 10000.0
    alignment_dim: int = 1024
    encoder_alignment: bool = True
    decoder_alignment: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    commitment_beta: float = runtime_field(0.25)
    nested_dropout_prob: float = runtime_field(0.2)
    attn_backend: str = runtime_field("sdpa")

    def __post_init__(self) -> None:
        ints = ("image_size", "cnn_channels", "cnn_res_blocks", "cnn_z_channels", "cnn_groups", "encoder_width",
                "encoder_depth", "encoder_heads", "decoder_width", "decoder_depth", "decoder_heads",
                "hierarchy_stages", "num_latent_tokens", "min_latent_tokens", "codebook_size", "codebook_dim")
        require_positive_ints(self, ints)
        self.cnn_channel_mult = tuple(self.cnn_channel_mult)
        if not self.cnn_channel_mult or any(not isinstance(m, int) or m < 1 for m in self.cnn_channel_mult):
            raise ValueError(f"cnn_channel_mult must be positive integers, got {self.cnn_channel_mult!r}")
        for c in [self.cnn_channels * m for m in self.cnn_channel_mult]:
            if c % self.cnn_groups:
                raise ValueError(f"CNN width {c} is not divisible by cnn_groups {self.cnn_groups}")
        stride = 2 ** (len(self.cnn_channel_mult) - 1)
        if self.image_size % stride:
            raise ValueError(f"image_size {self.image_size} is not divisible by the CNN stride {stride}")
        for name, w, h in (("encoder", self.encoder_width, self.encoder_heads),
                           ("decoder", self.decoder_width, self.decoder_heads)):
            if w % h or (w // h) % 4:
                raise ValueError(f"{name}_width / {name}_heads = {w}/{h} must be an integer head dim divisible by 4 (2D RoPE)")
        latent_level_sizes(self.num_latent_tokens)  # validates N
        if self.min_latent_tokens > self.num_latent_tokens or self.min_latent_tokens & (self.min_latent_tokens - 1):
            raise ValueError(f"min_latent_tokens must be a power of two <= num_latent_tokens, got {self.min_latent_tokens}")
        g = self.grid
        if self.encoder_depth < self.hierarchy_stages:
            raise ValueError(f"encoder_depth {self.encoder_depth} is below hierarchy_stages {self.hierarchy_stages}")
        if g % 2 ** (self.hierarchy_stages - 1):
            raise ValueError(f"token grid {g} cannot be halved {self.hierarchy_stages - 1} times "
                             f"for {self.hierarchy_stages} stages")
        for h, w in self.latent_grids:
            if g % h or g % w:
                raise ValueError(f"latent pooling grid {(h, w)} does not divide the {g}x{g} token grid; "
                                 f"use fewer num_latent_tokens or a larger image")
        if (self.encoder_alignment or self.decoder_alignment) and self.alignment_dim < 1:
            raise ValueError("alignment heads need alignment_dim >= 1")
        if not 0.0 <= self.nested_dropout_prob < 1.0:
            raise ValueError(f"nested_dropout_prob must be in [0, 1), got {self.nested_dropout_prob}")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} is not one of {ATTENTION_BACKENDS}")

    @property
    def grid(self) -> int:
        """Side G of the token grid (image_size / CNN stride)."""
        return self.image_size // 2 ** (len(self.cnn_channel_mult) - 1)

    @property
    def latent_levels(self) -> list[int]:
        """Tokens per latent level, ``[1, 1, 2, 4, ..., N/2]``."""
        return latent_level_sizes(self.num_latent_tokens)

    @property
    def latent_grids(self) -> list[tuple[int, int]]:
        """Pooling grid of every latent level (Algorithm 1)."""
        return [level_pooling_grid(n) for n in self.latent_levels]

    @property
    def merge_layers(self) -> list[int]:
        """Encoder layers followed by a merge: ``int(i / S * depth) - 1`` for i = 1..S-1."""
        S, n = self.hierarchy_stages, self.encoder_depth
        return [int(i / S * n) - 1 for i in range(1, S)]

    @property
    def image_stage_grids(self) -> list[tuple[int, int]]:
        """Grids of the image stages after the last merge, coarse first: (G, G/2^(S-1)) .. (G, G)."""
        g = self.grid
        return [(g, g // 2 ** s) for s in reversed(range(self.hierarchy_stages))]


# --------------------------------------------------------------------------------------------
# transformer pieces
# --------------------------------------------------------------------------------------------

class RoPEAttention(nn.Module):
    """Self-attention with q/v biases (no k bias), LayerNorm on q and k per head, 2D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5, backend: str = "sdpa") -> None:
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.q_norm = nn.LayerNorm(dim // num_heads, eps=eps)
        self.k_norm = nn.LayerNorm(dim // num_heads, eps=eps)
        self.proj = nn.Linear(dim, dim)
        self.fast_rope = True

    def forward(self, x_BLD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: MaskLike = None,
                q_from: int = 0) -> torch.Tensor:
        """Attention of the queries ``x[:, q_from:]`` over all of ``x``; ``mask`` has those query rows."""
        B, L, D = x_BLD.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x_BLD, self.qkv.weight, bias).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, K)
        rotate = apply_rope if self.fast_rope else apply_rope_reference
        q = rotate(self.q_norm(q[:, :, q_from:]), (rope[0][q_from:], rope[1][q_from:]))
        k = rotate(self.k_norm(k), rope)
        o_BHLK = attention(q, k, v, mask, self.backend)
        return self.proj(o_BHLK.transpose(1, 2).reshape(B, L - q_from, D))


class ResTokBlock(nn.Module):
    """Pre-norm block with layer scale: ``x + g1 * Attn(LN x)``, then ``x + g2 * MLP(LN x)``.

    The two halves are separate methods because the encoder merges tokens between them.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5, backend: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = RoPEAttention(dim, num_heads, eps, backend)
        self.layer_scale1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=True)
        self.layer_scale2 = nn.Parameter(torch.ones(dim))

    def attend(self, x_BLD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: MaskLike = None,
               q_from: int = 0) -> torch.Tensor:
        """``x + g1 * attn``; with ``q_from`` only the rows ``x[:, q_from:]`` (all rows still give keys)."""
        return torch.addcmul(x_BLD[:, q_from:], self.layer_scale1, self.attn(self.norm1(x_BLD), rope, mask, q_from))

    def feed_forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x_BLD, self.layer_scale2, self.mlp(self.norm2(x_BLD)))  # x + g2 * mlp

    def forward(self, x_BLD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: MaskLike = None,
                q_from: int = 0) -> torch.Tensor:
        return self.feed_forward(self.attend(x_BLD, rope, mask, q_from))


class _Stack(nn.Module):
    """Shared bits of encoder and decoder: blocks, backend switching, cached RoPE tables and masks."""

    def __init__(self, depth: int, dim: int, heads: int, cfg: ResTokConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResTokBlock(dim, heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_backend)
                                    for _ in range(depth))
        self.head_dim, self.theta, self.backend = dim // heads, cfg.rope_theta, cfg.attn_backend
        self.grad_checkpointing = False
        self.segment_masks = True
        self.last_layer_needed_rows = True  # fast path: the last layer computes only the rows that are read
        self._cache: dict[Any, Any] = {}

    def set_backend(self, backend: str) -> None:
        self.backend = backend
        for b in self.blocks:
            b.attn.backend = backend
        self._cache.clear()

    def set_fast_paths(self, enabled: bool) -> None:
        self.segment_masks = self.last_layer_needed_rows = enabled
        for b in self.blocks:
            b.attn.fast_rope = enabled
            b.mlp.inplace_act = enabled
        self._cache.clear()

    def _rope(self, key: Any, positions: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        k = ("rope", key, str(device))
        if k not in self._cache:
            self._cache[k] = rope_table(positions(), [self.head_dim // 2, self.head_dim // 2], self.theta)
        return self._cache[k]

    def _mask(self, blocks: Sequence[int], device: torch.device, q_from: int = 0) -> MaskLike:
        """Block-causal mask over ``blocks``; with ``q_from`` only its query rows from there on."""
        # segments need the mask's values (host syncs): not on the meta device, not inside a compiled graph
        segmented = (self.segment_masks and self.backend == "sdpa" and torch.device(device).type != "meta"
                     and not torch.compiler.is_compiling())
        key = ("mask", tuple(blocks), str(device), self.backend, segmented, q_from)
        if key not in self._cache:
            L = sum(blocks)
            if self.backend == "flex" and not q_from:
                from torch.nn.attention.flex_attention import create_block_mask

                self._cache[key] = create_block_mask(block_causal_mask_mod(blocks, device), None, None, L, L, device=device)
            else:
                dense = block_causal_mask(blocks, device)[q_from:]
                # a query block sees exactly the key prefix up to its own end: SDPA per run of blocks
                seg = segment_mask(dense) if segmented else None
                self._cache[key] = dense if seg is None else seg
        return self._cache[key]

    def _run(self, fn: Any, *args: Any) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class ResTokEncoder(_Stack):
    """Image tokens + residually initialised latent tokens through a merging ViT (see the module docstring)."""

    def __init__(self, cfg: ResTokConfig) -> None:
        D = cfg.encoder_width
        super().__init__(cfg.encoder_depth, D, cfg.encoder_heads, cfg)
        self.grid, self.levels, self.grids = cfg.grid, cfg.latent_levels, cfg.latent_grids
        self.merge_layers = cfg.merge_layers
        self.residual_image, self.residual_latent = cfg.residual_image_tokens, cfg.residual_latent_tokens
        self.legacy_layout = cfg.legacy_latent_layout
        self.token_in = nn.Linear(cfg.cnn_z_channels, D)
        self.stage_embed = nn.Parameter(torch.zeros(cfg.hierarchy_stages, D))
        self.latent_level_embed = nn.Parameter(torch.zeros(len(self.levels), D))
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.norm_post = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.level_out = nn.ModuleList(nn.Linear(D, cfg.codebook_dim) for _ in self.levels)

    def _level_expand(self, emb_VD: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor(self.levels, device=emb_VD.device)
        return emb_VD.repeat_interleave(sizes, dim=0, output_size=sum(self.levels))  # (N, D)

    def embed(self, feat_BZGG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CNN map -> (image tokens (B, G*G, D), latent tokens (B, N, D)), with their embeddings added."""
        B = feat_BZGG.shape[0]
        img_BLD = self.token_in(feat_BZGG.flatten(2).transpose(1, 2))  # (B, G*G, D)
        map_BDGG = img_BLD.transpose(1, 2).reshape(B, -1, self.grid, self.grid)
        lat_BND = residual_latent_init(map_BDGG, self.grids, self.residual_latent)
        return img_BLD + self.stage_embed[0], lat_BND + self._level_expand(self.latent_level_embed).to(lat_BND.dtype)

    def forward_tokens(self, img_BLD: torch.Tensor, lat_BND: torch.Tensor,
                       image_tokens: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The transformer part.

        With ``image_tokens=False`` (codes only) the last layer runs the latent rows alone (image
        tokens never attend to latents, so nothing else reads them) and no stages are returned.

        Returns:
            ``(latents (B, N, D) after the final norm, [image stages coarse..fine, each (B, n_s, D)])``.
        """
        N, G = lat_BND.shape[1], self.grid
        x = self.norm_pre(torch.cat((img_BLD, lat_BND), dim=1))
        stages = [G * G]  # image token counts, coarse first
        for i, blk in enumerate(self.blocks):
            s = len(stages) - 1
            grids = [(G, G // 2 ** k) for k in reversed(range(s + 1))]
            rope = self._rope(("enc", s, N), lambda g=grids: mixed_positions(g, N, tokens_first=False, device=x.device), x.device)
            if i in self.merge_layers:
                x = self._run(self._merge_layer, blk, x, rope, self._mask(stages + self.levels, x.device), stages[0], s + 1)
                stages.insert(0, stages[0] // 2)
            elif i == len(self.blocks) - 1 and not image_tokens and self.last_layer_needed_rows and self.backend != "flex":
                q_from = x.shape[1] - N
                return self.norm_post(self._run(blk, x, rope, self._mask(stages + self.levels, x.device, q_from), q_from)), []
            else:
                x = self._run(blk, x, rope, self._mask(stages + self.levels, x.device))
        img, out = x[:, :-N], []
        for n in stages:
            out.append(img[:, :n])
            img = img[:, n:]
        return self.norm_post(x[:, -N:]), out

    def _merge_layer(self, blk: ResTokBlock, x: torch.Tensor, rope: Any, mask: MaskLike, n_img: int, stage: int) -> torch.Tensor:
        x = merge_image_tokens(blk.attend(x, rope, mask), n_img, self.residual_image)
        x = blk.feed_forward(x)
        n = n_img // 2
        return torch.cat((x[:, :n] + self.stage_embed[stage], x[:, n:]), dim=1)

    def project(self, lat_BND: torch.Tensor) -> torch.Tensor:
        """Per-level projection to the code dim: (B, N, D) -> (B, N, d)."""
        B, N, D = lat_BND.shape
        # legacy: reinterpret the memory of (N, D) as (D, N) and treat column n as "token" n
        src = lat_BND.reshape(B, D, N).transpose(1, 2) if self.legacy_layout else lat_BND
        out, start = [], 0
        for n, proj in zip(self.levels, self.level_out):
            out.append(proj(src[:, start:start + n]))
            start += n
        return torch.cat(out, dim=1)

    def forward(self, feat_BZGG: torch.Tensor, image_tokens: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CNN map -> (pre-quantisation latents (B, N, d), image stages coarse-first)."""
        lat_BND, stages = self.forward_tokens(*self.embed(feat_BZGG), image_tokens=image_tokens)
        return self.project(lat_BND), stages


class ResTokDecoder(_Stack):
    """Codes (+ nested-dropout mask code) and G*G learned queries through a full-attention ViT."""

    def __init__(self, cfg: ResTokConfig) -> None:
        D = cfg.decoder_width
        super().__init__(cfg.decoder_depth, D, cfg.decoder_heads, cfg)
        self.grid, self.levels = cfg.grid, cfg.latent_levels
        self.latent_mask_token = nn.Parameter(torch.zeros(cfg.codebook_dim))
        self.level_in = nn.ModuleList(nn.Linear(cfg.codebook_dim, D) for _ in self.levels)
        self.latent_level_embed = nn.Parameter(torch.zeros(len(self.levels), D))
        self.image_query = nn.Parameter(torch.zeros(D))
        self.align_query = nn.Parameter(torch.zeros(D)) if cfg.decoder_alignment else None
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.norm_post = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.token_out = nn.Linear(D, cfg.cnn_z_channels)

    def forward(
        self, codes_BNd: torch.Tensor, keep_B: Optional[torch.Tensor] = None, with_alignment: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decode to the CNN map (B, Z, G, G); with ``with_alignment`` also the alignment features (B, D, G, G)."""
        B, N, _ = codes_BNd.shape
        G, x = self.grid, codes_BNd
        if keep_B is not None:  # nested dropout: the tail after each sample's prefix becomes the mask code
            kept = torch.arange(N, device=x.device)[None, :] < keep_B.to(x.device)[:, None]
            x = torch.where(kept[..., None], x, self.latent_mask_token.to(x.dtype))
        parts, start = [], 0
        for i, (n, proj) in enumerate(zip(self.levels, self.level_in)):
            parts.append(proj(x[:, start:start + n]) + self.latent_level_embed[i])
            start += n
        lat_BND = torch.cat(parts, dim=1)
        queries = self.image_query.expand(B, G * G, -1).to(lat_BND.dtype)
        if with_alignment:
            if self.align_query is None:
                raise ValueError("this ResTok has no decoder alignment head (decoder_alignment=False)")
            # a second, parallel set of queries reads the same codes (batch doubled, no interaction)
            lat_BND = torch.cat((lat_BND, lat_BND), dim=0)
            queries = torch.cat((queries, self.align_query.expand(B, G * G, -1).to(lat_BND.dtype)), dim=0)
        x = self.norm_pre(torch.cat((lat_BND, queries), dim=1))
        rope = self._rope(("dec", N), lambda: mixed_positions([(G, G)], N, tokens_first=True, device=x.device), x.device)
        for i, blk in enumerate(self.blocks):
            if i == len(self.blocks) - 1 and self.last_layer_needed_rows:  # only the image rows are read after it
                x = self._run(blk, x, rope, None, N)
            else:
                x = self._run(blk, x, rope, None)
        img = x[:, -G * G:]
        align = None
        if with_alignment:
            img, feat = img.chunk(2, dim=0)
            align = feat.transpose(1, 2).reshape(B, -1, G, G)  # before the final norm, as released
        out = self.token_out(self.norm_post(img))  # (B, G*G, Z)
        return out.transpose(1, 2).reshape(B, -1, G, G), align


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------


class ResTok(PretrainedMixin, nn.Module):
    """ResTok 1D VQ tokenizer.

    Example:
        >>> m = ResTok.from_preset("restok-tiny").eval()
        >>> enc = m.encode(x)                        # x in [-1, 1], (B, 3, 64, 64)
        >>> rec = m.decode_indices(enc["indices"])   # (B, 3, 64, 64)
        >>> coarse = m.decode_indices(enc["indices"][:, :8])   # first 8 tokens only
    """

    config_class: ClassVar[type] = ResTokConfig
    model_type: ClassVar[str] = "restok"
    presets = RESTOK_PRESETS

    def __init__(self, config: ResTokConfig) -> None:
        super().__init__()
        self.config = c = config
        cnn = dict(channels=c.cnn_channels, channel_mult=c.cnn_channel_mult, num_res_blocks=c.cnn_res_blocks,
                   z_channels=c.cnn_z_channels, groups=c.cnn_groups)
        self.pixel_encoder = ConvEncoder(3, **cnn)
        self.encoder = ResTokEncoder(c)
        self.quantizer = VectorQuantizer(c.codebook_size, c.codebook_dim, c.l2_normalized_codes, c.commitment_beta)
        self.decoder = ResTokDecoder(c)
        self.pixel_decoder = ConvDecoder(3, **cnn)
        self.encoder_align = nn.Linear(c.encoder_width, c.alignment_dim, bias=False) if c.encoder_alignment else None
        self.decoder_align = nn.Linear(c.decoder_width, c.alignment_dim, bias=False) if c.decoder_alignment else None
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation of the release: trunc-normal(0.02) linears/convs, N(0, 1/D) embeddings."""
        std = self.config.init_std

        def init(m: nn.Module) -> None:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(init)
        for stack in (self.encoder, self.decoder):
            D = stack.norm_pre.normalized_shape[0]
            for p in (getattr(stack, n, None) for n in ("stage_embed", "latent_level_embed", "image_query", "align_query")):
                if p is not None:
                    nn.init.normal_(p, std=D ** -0.5)
            for blk in stack.blocks:
                nn.init.ones_(blk.layer_scale1)
                nn.init.ones_(blk.layer_scale2)
                nn.init.zeros_(blk.attn.q_bias)
                nn.init.zeros_(blk.attn.v_bias)
        nn.init.normal_(self.decoder.latent_mask_token, std=self.config.decoder_width ** -0.5)
        self.quantizer.reset_parameters()

    # ---- construction -------------------------------------------------------------------------

    def set_attn_backend(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` ("sdpa", "reference" or "flex")."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend {backend!r} is not one of {ATTENTION_BACKENDS}")
        self.config = dataclasses.replace(self.config, attn_backend=backend)
        self.encoder.set_backend(backend)
        self.decoder.set_backend(backend)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute transformer layers in the backward pass (less memory, same gradients)."""
        self.encoder.grad_checkpointing = enabled
        self.decoder.grad_checkpointing = enabled

    def set_fast_paths(self, enabled: bool = True) -> None:
        """Switch every inference fast path on (default) or to its reference path (see the module docstring)."""
        self.encoder.set_fast_paths(enabled)
        self.decoder.set_fast_paths(enabled)
        for cnn in (self.pixel_encoder, self.pixel_decoder):
            cnn.channels_last = enabled
            for m in cnn.modules():
                if isinstance(m, ConvResBlock):
                    m.inplace_act = enabled
        self.pixel_decoder.fused_upsample = enabled

    # ---- nested dropout -----------------------------------------------------------------------
    def nested_dropout(self, batch_size: int, generator: Optional[torch.Generator] = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
        """Kept prefix length per sample, (B,) int64 (see :func:`nested_dropout_choices`)."""
        c = self.config
        lengths, probs = nested_dropout_choices(c.num_latent_tokens, c.min_latent_tokens, c.nested_dropout_prob)
        gdev = generator.device if generator is not None else "cpu"
        pick = torch.multinomial(torch.tensor(probs, device=gdev), batch_size, replacement=True, generator=generator)
        return torch.tensor(lengths, device=gdev)[pick].to(device if device is not None else self.pixel_mean.device)

    def _keep(self, keep: KeepLike, B: int, device: torch.device) -> Optional[torch.Tensor]:
        N = self.config.num_latent_tokens
        if keep is None:
            return None
        if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):  # int, np.int64, ...
            k = torch.full((B,), int(keep), dtype=torch.long, device=device)
        elif isinstance(keep, torch.Tensor) and not (keep.is_floating_point() or keep.is_complex()
                                                     or keep.dtype == torch.bool):
            k = keep.to(device).long()
        else:
            raise ValueError(f"keep must be an integer or an integer (B={B},) tensor of prefix lengths, "
                             f"got {type(keep).__name__} {getattr(keep, 'dtype', '')}".rstrip())
        if k.shape != (B,):
            raise ValueError(f"keep must be an int or a (B={B},) tensor of prefix lengths, got shape {tuple(k.shape)}")
        if bool(((k < 1) | (k > N)).any()):
            raise ValueError(f"kept prefix lengths must lie in [1, {N}], got {k.tolist()}")
        return k

    # ---- API ----------------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        check_images(x, 3, self.config.image_size, self.training)

    def encode(self, x_BCHW: torch.Tensor, image_tokens: bool = True) -> dict[str, Any]:
        """Images in [-1, 1] -> codes (``image_tokens=False``: no image stages and no alignment
        output, and the encoder's last layer runs its latent rows alone; see :meth:`encode_indices`).

        Returns:
            dict with ``indices`` (B, N) int64, ``quantized`` (B, N, d) (straight-through),
            ``latents`` (B, N, d) before quantisation, ``vq_loss`` (codebook + beta * commitment),
            ``commitment_loss``, ``codebook_loss``, ``image_tokens`` (the encoder's image stages,
            coarse first, each (B, n_s, D)) and, with an encoder alignment head,
            ``encoder_alignment`` (B, n_0, A): the projected coarsest image tokens.
        """
        self._check_images(x_BCHW)
        x01 = (x_BCHW + 1.0) / 2.0
        feat = self.pixel_encoder((x01 - self.pixel_mean) / self.pixel_std)  # (B, Z, G, G)
        z_BNd, stages = self.encoder(feat, image_tokens)
        vq = self.quantizer(z_BNd)
        out = {"indices": vq.indices, "quantized": vq.quantized, "latents": z_BNd, "vq_loss": vq.loss,
               "commitment_loss": vq.commitment_loss, "codebook_loss": vq.codebook_loss, "image_tokens": stages}
        if self.encoder_align is not None and stages:
            out["encoder_alignment"] = self.encoder_align(stages[0])
        return out

    def encode_indices(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> code indices (B, N): only what the codes need (inference, code extraction)."""
        return self.encode(x_BCHW, image_tokens=False)["indices"]

    def decode(self, quantized_BNd: torch.Tensor, keep: KeepLike = None, with_alignment: bool = False) -> Any:
        """Code vectors (B, N, d) -> images in [-1, 1]; ``keep`` masks all but a prefix (int or (B,)).

        With ``with_alignment`` returns ``(images, alignment features (B, A, G, G))``.
        """
        c = self.config
        if quantized_BNd.ndim != 3 or tuple(quantized_BNd.shape[1:]) != (c.num_latent_tokens, c.codebook_dim):
            raise ValueError(f"expected codes of shape (B, {c.num_latent_tokens}, {c.codebook_dim}), "
                             f"got {tuple(quantized_BNd.shape)}")
        keep_B = self._keep(keep, quantized_BNd.shape[0], quantized_BNd.device)
        feat, align = self.decoder(quantized_BNd, keep_B, with_alignment)
        dev = feat.device.type
        ctx = torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()
        with ctx:  # the pixel decoder runs in float32, as released
            img01 = self.pixel_decoder(feat.float())
        img = img01 * 2.0 - 1.0
        if with_alignment:
            assert self.decoder_align is not None and align is not None
            return img, self.decoder_align(align.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return img

    def decode_indices(self, indices_Bn: torch.Tensor) -> torch.Tensor:
        """Code indices (B, n), n <= N a prefix of the sequence -> images in [-1, 1]; missing tokens are masked."""
        N = self.config.num_latent_tokens
        if indices_Bn.ndim != 2 or not 1 <= indices_Bn.shape[1] <= N:
            raise ValueError(f"expected indices of shape (B, n) with 1 <= n <= {N}, got {tuple(indices_Bn.shape)}")
        B, n = indices_Bn.shape
        q = self.quantizer.decode(indices_Bn)
        if n < N:
            q = torch.cat((q, q.new_zeros(B, N - n, q.shape[-1])), dim=1)
        return self.decode(q, keep=n if n < N else None)

    # ---- the Tokenizer interface (tokenizers/base.py) ----
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def output_sides(self) -> list[int]:
        return [self.config.image_size]

    def tokenize(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Code indices (B, N): what the HAR / AR generator models."""
        return self.encode_indices(x_BCHW)

    def detokenize(self, indices_Bn: torch.Tensor, all_scales: bool = False) -> torch.Tensor:
        if all_scales:
            raise ValueError("all_scales: ResTok decodes one image per code sequence (no pyramid)")
        return self.decode_indices(indices_Bn.long())

    def reconstruct(self, x_BCHW: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        idx = self.tokenize(x_BCHW)
        return [self.decode_indices(idx)], idx

    def last_layer(self) -> torch.Tensor:
        return self.pixel_decoder.conv_out.weight

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(
        self,
        x_BCHW: torch.Tensor,
        keep: KeepLike = None,
        generator: Optional[torch.Generator] = None,
        return_alignment: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Encode, quantise, (nested-dropout,) decode.

        Args:
            x_BCHW: images in [-1, 1].
            keep: kept prefix length(s); ``None`` draws them by nested dropout in training mode
                (with ``generator`` when given) and keeps everything in eval mode.
            generator: random source for nested dropout.
            return_alignment: also return the alignment outputs (default: in training mode when
                the model has alignment heads).

        Returns:
            :meth:`encode`'s dict plus ``reconstructions`` (B, 3, H, W) in [-1, 1], ``keep``
            (B,) kept prefix lengths (None when nothing was masked) and, with alignment,
            ``decoder_alignment`` (B, A, G, G).
        """
        out = self.encode(x_BCHW)
        B = x_BCHW.shape[0]
        if keep is None and self.training and self.config.nested_dropout_prob > 0:
            keep_B: Optional[torch.Tensor] = self.nested_dropout(B, generator, x_BCHW.device)  # valid by construction
        else:
            keep_B = self._keep(keep, B, x_BCHW.device)
        if return_alignment and self.decoder_align is None:
            raise ValueError("return_alignment=True, but this ResTok has no decoder alignment head (decoder_alignment=False)")
        want = self.training if return_alignment is None else return_alignment
        if want and self.decoder_align is not None:
            out["reconstructions"], out["decoder_alignment"] = self.decode(out["quantized"], keep_B, with_alignment=True)
        else:
            out["reconstructions"] = self.decode(out["quantized"], keep_B)
        if not want:
            out.pop("encoder_alignment", None)
        out["keep"] = keep_B
        return out
