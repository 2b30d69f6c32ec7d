"""ResTok's ViT encoder (hierarchical merging under a level-causal mask) and decoder.

Legend: B batch, L sequence, D width, Z CNN map channels, G token-grid side, N latent tokens, d code dim.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ...nn.attention import Attention, MaskLike
from ...nn.masks import MaskSpec
from ...nn.mlp import Mlp
from ...nn.rope import mixed_positions, rope_table
from ...nn.transformer import checkpointed
from .config import ResTokConfig
from .hierarchy import merge_image_tokens, residual_latent_init


class ResTokBlock(nn.Module):
    """Pre-norm block with layer scale: ``x + g1 * Attn(LN x)``, then ``x + g2 * MLP(LN x)``.

    The two halves are separate methods because the encoder merges tokens between them.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5, backend: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        # q/v biases (none on k), LayerNorm on q and k per head, 2D RoPE on q and k
        self.attn = Attention(dim, num_heads, qkv_bias="qv", qk_norm=True, norm_eps=eps, backend=backend)
        self.layer_scale1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=True)
        self.layer_scale2 = nn.Parameter(torch.ones(dim))

    def attend(self, x_BLD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: MaskLike = None,
               q_from: int = 0) -> torch.Tensor:
        """``x + g1 * attn``; with ``q_from`` only the rows ``x[:, q_from:]`` (all rows still give keys)."""
        return torch.addcmul(x_BLD[:, q_from:], self.layer_scale1, self.attn(self.norm1(x_BLD), mask, rope=rope, q_from=q_from))

    def feed_forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x_BLD, self.layer_scale2, self.mlp(self.norm2(x_BLD)))  # x + g2 * mlp

    def forward(self, x_BLD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: MaskLike = None,
                q_from: int = 0) -> torch.Tensor:
        return self.feed_forward(self.attend(x_BLD, rope, mask, q_from))


class _Stack(nn.Module):
    """Shared bits of encoder and decoder: blocks, cached RoPE tables, the block runner."""

    def __init__(self, depth: int, dim: int, heads: int, cfg: ResTokConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResTokBlock(dim, heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_backend)
                                    for _ in range(depth))
        self.head_dim, self.theta = dim // heads, cfg.rope_theta
        self.grad_checkpointing = False
        self.last_layer_needed_rows = True  # fast path: the last layer computes only the rows that are read
        self._ropes: dict[Any, Any] = {}

    def _rope(self, key: Any, positions: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        k = (key, str(device))
        if k not in self._ropes:
            self._ropes[k] = rope_table(positions(), [self.head_dim // 2, self.head_dim // 2], self.theta)
        return self._ropes[k]

    def _rows_only(self) -> bool:
        """Whether the last layer may compute only the rows read after it (not with flex, whose
        block masks are built for whole sequences here)."""
        return self.last_layer_needed_rows and self.blocks[-1].attn.backend != "flex"

    def _run(self, fn: Any, *args: Any) -> torch.Tensor:
        return checkpointed(self.grad_checkpointing and self.training, fn, *args)


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
        B, _, gh, gw = feat_BZGG.shape
        img_BLD = self.token_in(feat_BZGG.flatten(2).transpose(1, 2))  # (B, Gh*Gw, D)
        map_BDGG = img_BLD.transpose(1, 2).reshape(B, -1, gh, gw)
        lat_BND = residual_latent_init(map_BDGG, self.grids, self.residual_latent)
        return img_BLD + self.stage_embed[0], lat_BND + self._level_expand(self.latent_level_embed).to(lat_BND.dtype)

    def forward_tokens(self, img_BLD: torch.Tensor, lat_BND: torch.Tensor, image_tokens: bool = True,
                       grid: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The transformer part, for image tokens of a ``grid`` (Gh, Gw) (default: the training G x G;
        a merge halves the row-major width, RoPE positions follow the grid).

        With ``image_tokens=False`` (codes only) the last layer runs the latent rows alone (image
        tokens never attend to latents, so nothing else reads them) and no stages are returned.

        Returns:
            ``(latents (B, N, D) after the final norm, [image stages coarse..fine, each (B, n_s, D)])``.
        """
        N = lat_BND.shape[1]
        gh, gw = grid or (self.grid, self.grid)
        x = self.norm_pre(torch.cat((img_BLD, lat_BND), dim=1))
        stages = [gh * gw]  # image token counts, coarse first
        for i, blk in enumerate(self.blocks):
            s = len(stages) - 1
            grids = [(gh, gw // 2 ** k) for k in reversed(range(s + 1))]
            rope = self._rope(("enc", s, N, gh, gw), lambda g=grids: mixed_positions(g, N, tokens_first=False, device=x.device), x.device)
            if i in self.merge_layers:
                x = self._run(self._merge_layer, blk, x, rope, MaskSpec(stages + self.levels), stages[0], s + 1)
                stages.insert(0, stages[0] // 2)
            elif i == len(self.blocks) - 1 and not image_tokens and self._rows_only():
                q_from = x.shape[1] - N
                return self.norm_post(self._run(blk, x, rope, MaskSpec(stages + self.levels), q_from)), []
            else:
                x = self._run(blk, x, rope, MaskSpec(stages + self.levels))
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
        lat_BND, stages = self.forward_tokens(*self.embed(feat_BZGG), image_tokens=image_tokens,
                                              grid=tuple(feat_BZGG.shape[-2:]))
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
        self, codes_BNd: torch.Tensor, keep_B: Optional[torch.Tensor] = None, with_alignment: bool = False,
        grid: Optional[tuple[int, int]] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decode to the CNN map (B, Z, Gh, Gw) of ``grid`` (default: the training G x G; one learned
        query per position, 2D RoPE tells them apart); with ``with_alignment`` also the alignment
        features (B, D, Gh, Gw)."""
        B, N, _ = codes_BNd.shape
        (gh, gw), x = grid or (self.grid, self.grid), codes_BNd
        L = gh * gw
        if keep_B is not None:  # nested dropout: the tail after each sample's prefix becomes the mask code
            kept = torch.arange(N, device=x.device)[None, :] < keep_B.to(x.device)[:, None]
            x = torch.where(kept[..., None], x, self.latent_mask_token.to(x.dtype))
        parts, start = [], 0
        for i, (n, proj) in enumerate(zip(self.levels, self.level_in)):
            parts.append(proj(x[:, start:start + n]) + self.latent_level_embed[i])
            start += n
        lat_BND = torch.cat(parts, dim=1)
        queries = self.image_query.expand(B, L, -1).to(lat_BND.dtype)
        if with_alignment:
            if self.align_query is None:
                raise ValueError("this ResTok has no decoder alignment head (decoder_alignment=False)")
            # a second, parallel set of queries reads the same codes (batch doubled, no interaction)
            lat_BND = torch.cat((lat_BND, lat_BND), dim=0)
            queries = torch.cat((queries, self.align_query.expand(B, L, -1).to(lat_BND.dtype)), dim=0)
        x = self.norm_pre(torch.cat((lat_BND, queries), dim=1))
        rope = self._rope(("dec", N, gh, gw), lambda: mixed_positions([(gh, gw)], N, tokens_first=True, device=x.device), x.device)
        for i, blk in enumerate(self.blocks):
            if i == len(self.blocks) - 1 and self._rows_only():  # only the image rows are read after it
                x = self._run(blk, x, rope, None, N)
            else:
                x = self._run(blk, x, rope, None)
        img = x[:, -L:]
        align = None
        if with_alignment:
            img, feat = img.chunk(2, dim=0)
            align = feat.transpose(1, 2).reshape(B, -1, gh, gw)  # before the final norm, as released
        out = self.token_out(self.norm_post(img))  # (B, Gh*Gw, Z)
        return out.transpose(1, 2).reshape(B, -1, gh, gw), align
