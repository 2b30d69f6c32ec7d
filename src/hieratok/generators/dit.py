"""DiT: a class-conditional diffusion transformer with adaLN-Zero blocks (Peebles & Xie, 2023),
run on HieraTok latents (HieraTok appendix F: vanilla DiT-XL on the f16 latent before downsampling).

    latent (B, C, H, W) --patch embed (p)--> tokens (B, L, D) + fixed 2D sin-cos positions
    c = timestep embedding(t) + label embedding(y)              (label id num_classes = null class)
    N x [adaLN-Zero block: x + g1 * Attn(LN(x)*(1+s1)+b1); x + g2 * MLP(LN(x)*(1+s2)+b2)]
    final adaLN layer --> (B, L, p*p*C_out) --unpatchify--> (B, C_out, H, W)

``C_out = 2C`` with a learned variance (diffusion, the first C channels are the noise prediction)
and ``C_out = C`` otherwise (flow matching predicts a velocity). Every modulation and the output
projection start at zero, so an untrained DiT outputs exactly zero ("adaLN-Zero").

Legend: B batch, C latent channels, H/W latent side, L tokens, D width, p patch size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..config import require_positive_ints, runtime_field
from ..hub import PretrainedMixin
from ..nn import Attention, Mlp, PatchEmbed, checkpointed, set_attention_backend, unpatchify
from ..nn.attention import check_backend
from ..nn.linear import Linear
from ..presets import DIT_PRESETS
from .latents import LatentNormalizer, rand

__all__ = [
    "DiTConfig", "DiT", "DiTBlock", "TimestepEmbedder", "LabelEmbedder",
    "timestep_embedding", "sincos_pos_embed_2d", "count_parameters",
]

POS_EMBEDS = ("sincos", "learned")


# ---- configuration ------------------------------------------------------------------------------
@dataclass
class DiTConfig:
    """Architecture of a DiT (defaults: DiT-XL/1 on the HieraTok f16d16 latent, 16 x 16 x 16).

    ``latent_mean`` / ``latent_std`` are the per-channel statistics of the tokenizer latents the
    model was trained on (None = identity); see :class:`LatentNormalizer`. The null class used for
    classifier-free guidance has id ``num_classes``.
    """

    input_size: int = 16
    patch_size: int = 1
    in_channels: int = 16
    depth: int = 28
    width: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    pos_embed: str = "sincos"  # fixed 2D sin-cos (DiT) or "learned"
    qkv_bias: bool = True
    freq_embed_dim: int = 256  # sinusoidal timestep features fed to the timestep MLP
    max_period: float = 10000.0
    norm_eps: float = 1e-6
    latent_mean: Optional[tuple[float, ...]] = None
    latent_std: Optional[tuple[float, ...]] = None
    class_dropout_prob: float = runtime_field(0.1)
    attn_backend: str = runtime_field("sdpa")

    def __post_init__(self) -> None:
        require_positive_ints(self, ("input_size", "patch_size", "in_channels", "depth", "width", "num_heads",
                                     "num_classes", "freq_embed_dim"))
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed == "sincos" and self.width % 4:
            raise ValueError(f"sin-cos positions need width divisible by 4, got {self.width}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed {self.pos_embed!r} is not one of {POS_EMBEDS}")
        check_backend(self.attn_backend)
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.latent_mean is not None:
            self.latent_mean = tuple(float(v) for v in self.latent_mean)
        if self.latent_std is not None:
            self.latent_std = tuple(float(v) for v in self.latent_std)
        norm = LatentNormalizer(self.latent_mean, self.latent_std)  # validates
        if norm.num_channels not in (None, self.in_channels):
            raise ValueError(f"latent_mean/latent_std have {norm.num_channels} channels, in_channels is {self.in_channels}")

    @property
    def grid(self) -> int:
        """Token-grid side input_size / patch_size."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def null_class(self) -> int:
        """Label id of the learned "no class" embedding used for classifier-free guidance."""
        return self.num_classes


# ---- embeddings ---------------------------------------------------------------------------------
def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: [cos(t w_k), sin(t w_k)], w_k =
    max_period^(-k / (dim/2)), k < dim/2 (odd ``dim`` gets a zero pad). Returns (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = t_B.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions (MAE / DiT layout), (grid*grid, dim) float32, row-major tokens.

    The first half of the channels encodes the column index, the second half the row index; each
    half is [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # (dim/4,)
    idx = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")  # token (i, j) sits at row i, column j

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (L, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (L, dim/2)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Timestep t (B,) -> (B, D): sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, width: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        f = timestep_embedding(t_B, self.freq_dim, self.max_period)
        return self.mlp(f.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label (B,) -> (B, D), with a learned null class (id ``num_classes``) for CFG.

    Label dropout (probability ``dropout_prob``, training only) replaces labels by the null class; the
    dropped rows come from an explicit boolean mask or are drawn from a ``torch.Generator``.
    """

    def __init__(self, num_classes: int, width: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, width)  # last row: the null class

    def drop_mask(self, batch: int, generator: Optional[torch.Generator] = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
        """Bernoulli(dropout_prob) bool mask (B,), True = replace the label by the null class."""
        return rand((batch,), generator, device) < self.dropout_prob

    def forward(self, y_B: torch.Tensor, drop_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        if drop_B is not None:
            y_B = torch.where(drop_B.to(device=y_B.device, dtype=torch.bool), torch.full_like(y_B, self.num_classes), y_B)
        return self.embedding_table(y_B)


# ---- blocks -------------------------------------------------------------------------------------
def modulate(x_BLD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BLD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT section 3.2): the condition c regresses
    shift, scale and a residual gate for both the attention and the MLP branch."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, backend: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(width, num_heads, qkv_bias=qkv_bias, backend=backend, linear=Linear)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), bias=True, approximate="tanh", linear=Linear)  # DiT's MLP
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 6 * width))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c_BD).chunk(6, dim=1)  # each (B, D)
        x_BLD = x_BLD + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x_BLD), sh1, sc1))
        return x_BLD + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x_BLD), sh2, sc2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to p*p*C_out values per token."""

    def __init__(self, width: int, patch_size: int, out_channels: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=norm_eps)
        self.linear = Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 2 * width))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x_BLD), shift, scale))


# ---- model --------------------------------------------------------------------------------------
class DiT(PretrainedMixin, nn.Module):
    """Class-conditional latent diffusion / flow transformer.

    ``forward(x, t, y)`` maps a noisy normalised latent ``x`` (B, C, H, W), timesteps ``t`` (B,) (any
    float; the diffusion objective passes 0..999, flow matching ``t * time_scale``) and labels ``y``
    (B,) in [0, num_classes] (``num_classes`` = null class) to (B, C_out, H, W).

    Example:
        >>> m = DiT.from_preset("dit-xl", in_channels=16, input_size=16, patch_size=1)
        >>> out = m(x_BCHW, t_B, y_B)                # (B, 2C, H, W) with learn_sigma
        >>> g = m.forward_with_cfg(x_BCHW, t_B, y_B, cfg_scale=4.0)
    """

    config_class: ClassVar[type] = DiTConfig
    model_type: ClassVar[str] = "dit"
    presets = DIT_PRESETS

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.width)
        if c.pos_embed == "sincos":  # fixed: recomputed, not stored in checkpoints
            self.register_buffer("pos_embed", sincos_pos_embed_2d(c.width, c.grid)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, c.width))
        self.t_embedder = TimestepEmbedder(c.width, c.freq_embed_dim, c.max_period)
        self.y_embedder = LabelEmbedder(c.num_classes, c.width, c.class_dropout_prob)
        self.blocks = nn.ModuleList(
            DiTBlock(c.width, c.num_heads, c.mlp_ratio, c.qkv_bias, c.norm_eps, c.attn_backend) for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(c.width, c.patch_size, c.out_channels, c.norm_eps)
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier-uniform linears, N(0, 0.02) label table and timestep MLP, zero adaLN
        modulations and a zero output layer (so the untrained model outputs exactly 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map over the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ---- construction / switches ----------------------------------------------------------------

    @property
    def normalizer(self) -> LatentNormalizer:
        """Map between tokenizer latents and this model's working space (from the config)."""
        return LatentNormalizer(self.config.latent_mean, self.config.latent_std)

    @property
    def null_class(self) -> int:
        return self.config.null_class

    def set_attn_backend(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` ("sdpa" or "reference")."""
        self.config = dataclasses.replace(self.config, attn_backend=check_backend(backend))
        set_attention_backend(self, backend)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute DiT blocks in the backward pass (less memory, same gradients)."""
        self.grad_checkpointing = enabled

    def label_drop_mask(self, batch: int, generator: Optional[torch.Generator] = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
        """The CFG label-dropout mask (B,) a training forward would draw, from ``generator``."""
        return self.y_embedder.drop_mask(batch, generator, device)

    # ---- forward ----------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.config
        want = (c.in_channels, c.input_size, c.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected latents of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        B = x.shape[0]
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,) or y.shape != (B,):
            raise ValueError(f"t and y must have shape ({B},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels y must be an integer tensor, got {y.dtype}")
        # Range check only where it costs no device sync; on accelerators the embedding lookup asserts.
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > c.num_classes):
            raise ValueError(f"labels must be in [0, {c.num_classes}] ({c.num_classes} = null class), got {y.min()}..{y.max()}")
        return t

    def forward(
        self,
        x_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        y_B: torch.Tensor,
        drop_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Predict noise (+ variance values) or velocity for a batch of noisy latents.

        Args:
            x_BCHW: normalised noisy latents (B, C, H, W).
            t_B: timesteps (B,) (or a scalar for the whole batch).
            y_B: integer labels (B,) in [0, num_classes]; ``num_classes`` is the null class.
            drop_labels: optional bool mask (B,), True = use the null class. Without it, a module in
                training mode drops labels with probability ``class_dropout_prob`` (CFG training),
                drawing the mask from ``generator``; in eval mode no label is dropped.
            generator: random source for the label-dropout mask.

        Returns:
            (B, C_out, H, W), C_out = 2C with ``learn_sigma`` (noise first, then variance values).
        """
        c = self.config
        t_B = self._check_inputs(x_BCHW, t_B, y_B)
        if drop_labels is None and self.training and c.class_dropout_prob > 0:
            drop_labels = self.label_drop_mask(x_BCHW.shape[0], generator, y_B.device)
        x_BLD = self.x_embedder(x_BCHW) + self.pos_embed.to(x_BCHW.dtype)
        c_BD = self.t_embedder(t_B) + self.y_embedder(y_B, drop_labels)
        for blk in self.blocks:
            x_BLD = checkpointed(self.grad_checkpointing and self.training, blk, x_BLD, c_BD)
        x_BLK = self.final_layer(x_BLD, c_BD)  # (B, L, p*p*C_out)
        return unpatchify(x_BLK, c.grid, c.patch_size, c.out_channels)

    def forward_with_cfg(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guided prediction ``uncond + s * (cond - uncond)`` (Ho & Salimans, 2022).

        Guidance applies to the first C output channels (the noise, or the whole velocity without a
        learned variance); the variance values come from the conditional pass, as in DiT. The
        conditional and null-class passes run as one batch of 2B. ``cfg_scale == 1`` is exactly the
        conditional model (one pass). Labels are never randomly dropped here, in any mode.
        """
        B = x_BCHW.shape[0]
        t_B = self._check_inputs(x_BCHW, t_B, y_B)
        no_drop = torch.zeros(B, dtype=torch.bool, device=y_B.device)
        if cfg_scale == 1.0:
            return self(x_BCHW, t_B, y_B, drop_labels=no_drop)
        out = self(torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]),
                   torch.cat([y_B, torch.full_like(y_B, self.null_class)]), drop_labels=torch.cat([no_drop, no_drop]))
        cond, uncond = out[:B], out[B:]
        C = self.config.in_channels
        guided = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
        return torch.cat([guided, cond[:, C:]], dim=1)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (fixed sin-cos positions are a buffer and not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

