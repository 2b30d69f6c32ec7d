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
  ``allowed(q, k) = block(q) >= block(k)`` (a causal :class:`hieratok.nn.masks.MaskSpec`).
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
:meth:`ResTok.set_fast_paths` flips them all; parity: tests/tokenizers/restok/test_restok_fast_paths.py):

* encoder attention: the level-causal mask is run as a
  :class:`~hieratok.nn.attention.SegmentedMask` (SDPA per run of query blocks over the key
  prefix they see; no masked-out block is computed), ``Attention.segment_masks``;
* RoPE as a complex multiply (:func:`hieratok.nn.rope.apply_rope`), ``Attention.fast_rope``;
* the CNN front / back end's fast paths (:mod:`hieratok.nn.conv_autoencoder`: channels-last on
  CPU, in-place activations without autograd, conv + residual as one oneDNN call, upsample + conv
  at the low resolution) and the in-place, row-chunked MLP of :class:`hieratok.nn.mlp.Mlp`;
* the last layer computes only the rows that are read afterwards (``_Stack.last_layer_needed_rows``):
  the decoder's image rows, and the encoder's latent rows when no image tokens are asked for
  (:meth:`ResTok.encode_indices`; image tokens never attend to latents).

Images are in [-1, 1] (the library convention); internally they are mapped to [0, 1] and
ImageNet-normalised, and the decoder's [0, 1] output is mapped back, so released weights
behave as trained.

Legend: B batch, L sequence, D width, Z CNN map channels, G token-grid side, N latent tokens,
d code dim, K head dim, A alignment feature width.
"""

from .config import ResTokConfig
from .hierarchy import (
    latent_level_sizes,
    latent_levels_to_map,
    level_pooling_grid,
    merge_image_tokens,
    nested_dropout_choices,
    residual_latent_init,
)
from .model import ResTok

__all__ = [
    "ResTokConfig", "ResTok",
    "residual_latent_init", "latent_levels_to_map", "merge_image_tokens", "latent_level_sizes",
    "level_pooling_grid", "nested_dropout_choices",
]
