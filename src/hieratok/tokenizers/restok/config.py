"""The architecture configuration of a ResTok tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import require_positive_ints, runtime_field
from ...nn.attention import ATTENTION_BACKENDS
from .hierarchy import latent_level_sizes, level_pooling_grid


@dataclass
class ResTokConfig:
    """Architecture of a ResTok tokenizer (defaults: the released ``restok_l_128``).

    Attributes:
        image_size: the training side (square); other sizes: :meth:`grid_shape`.
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
    def stride(self) -> int:
        """Downsampling factor of the CNN front end."""
        return 2 ** (len(self.cnn_channel_mult) - 1)

    @property
    def size_multiples(self) -> tuple[int, int]:
        """(height, width) multiples in pixels an image needs: the token grid's height must hold every
        latent level's pooling rows, its width those columns and S - 1 halvings (merging)."""
        h = max(h for h, _ in self.latent_grids)
        w = max(max(w for _, w in self.latent_grids), 2 ** (self.hierarchy_stages - 1))
        return self.stride * h, self.stride * w

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (Gh, Gw) of a ``height`` x ``width`` image; a ValueError naming the multiples
        for a size that cannot work (the latent pooling grids and the merges must divide the grid)."""
        mh, mw = self.size_multiples
        if height % mh or width % mw or height < mh or width < mw:
            raise ValueError(f"image size {height}x{width} does not work for this ResTok: height must be a multiple "
                             f"of {mh} and width of {mw} (CNN stride {self.stride} x latent pooling grids and "
                             f"{self.hierarchy_stages - 1} merges)")
        return height // self.stride, width // self.stride

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
