"""LlamaGen-style class-conditional GPT (decoder-only transformer) for 1D code sequences.

The generator of ResTok (arXiv 2601.03955, sec. 3.4) is LlamaGen's GPT: pre-norm blocks with
RMSNorm, a SwiGLU feed-forward net, 1D rotary position embeddings and a class embedding that
occupies the first position of the sequence. The null class (id ``num_classes``) is the
unconditional input for classifier-free guidance. For next-hierarchy prediction (HAR) the model
also has a table of learned placeholder embeddings; a token id ``vocab_size + j`` in the input
stands for placeholder ``j``. What the sequence looks like and which positions see which is
decided by :mod:`hieratok.generators.har`; this file only knows tokens, positions and masks.

Positions follow ResTok's variant of LlamaGen: 1D RoPE with the class token at position 0 and the
token at sequence index i at position i (LlamaGen's own class-to-image model used 2D RoPE).

Decoding uses :class:`KVCache`: preallocated keys and values per layer, a prefill and then steps
of any number of new tokens, each with its own rows of the attention mask.

Fast paths for sampling on CPU (:meth:`GPT.set_fast_paths` switches them to their reference
paths; parity: tests/har/test_gpt_fast_paths.py): the linear layers keep their weights prepacked
for MKL's gemm (:class:`hieratok.nn.linear.Linear`), RoPE rotates the channel pairs as one complex
multiply (:func:`hieratok.nn.rope.rotate_pairs`), and a mask whose rows see every key so far
(every step of a block-causal layout) runs as unmasked attention.

Legend: B batch, L new tokens, T cached + new tokens, D width, H heads, K head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import require_positive_ints, runtime_field
from ..hub import PretrainedMixin
from ..nn.attention import attention
from ..nn.linear import Linear
from ..nn.rope import rotate_pairs
from ..presets import GPT_PRESETS
from .latents import rand

__all__ = [
    "GPTConfig", "GPT", "KVCache", "check_ids", "RMSNorm", "SwiGLU",
    "swiglu_hidden_dim", "apply_rope_1d",
]

GPT_BACKENDS = ("sdpa", "reference")


@dataclass
class GPTConfig:
    """Configuration of :class:`GPT` (LlamaGen ``ModelArgs`` for the class-conditional model).

    Attributes:
        vocab_size: codebook size V (the output classes).
        dim: width D.
        depth: number of transformer blocks.
        num_heads: attention heads H (D must be divisible by H).
        num_classes: class labels; id ``num_classes`` is the null class used for guidance.
        num_placeholders: learned placeholder embeddings for HAR inputs (ResTok: 127; 0 for a
            plain next-token model).
        ffn_multiple_of: the SwiGLU hidden size is rounded up to a multiple of this.
        ffn_dim_multiplier: optional factor on the SwiGLU hidden size (LlamaGen: None).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE frequency base.
        init_std: std of the normal init of linear and embedding weights.
        max_seq_len: length of the precomputed RoPE table (longer sequences compute it on the fly).
        class_dropout: probability that a label is replaced by the null class in training.
        token_dropout: dropout on the input embeddings in training.
        resid_dropout: dropout after the attention output projection in training.
        ffn_dropout: dropout after the feed-forward net in training.
        attn_backend: ``"sdpa"`` or ``"reference"`` (see :mod:`hieratok.nn.attention`).
    """

    vocab_size: int = 8192
    dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    num_classes: int = 1000
    num_placeholders: int = 127
    ffn_multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    init_std: float = 0.02
    max_seq_len: int = runtime_field(256)
    class_dropout: float = runtime_field(0.1)
    token_dropout: float = runtime_field(0.1)
    resid_dropout: float = runtime_field(0.1)
    ffn_dropout: float = runtime_field(0.1)
    attn_backend: str = runtime_field("sdpa")

    def __post_init__(self) -> None:
        require_positive_ints(self, ("vocab_size", "dim", "depth", "num_heads", "num_classes"))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size (RoPE)")
        if self.attn_backend not in GPT_BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} is not one of {GPT_BACKENDS}")
        if self.num_placeholders < 0:
            raise ValueError(f"num_placeholders must be >= 0, got {self.num_placeholders}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (null) class."""
        return self.num_classes


def check_ids(ids: torch.Tensor, high: int, what: str) -> None:
    """ValueError unless every integer id lies in ``[0, high)``.

    On CPU the check is eager. On accelerators it is queued on the device
    (``torch._assert_async``): a training step makes no host sync for it, and a bad id fails the
    step at the next synchronisation instead of being read, e.g., as a placeholder.
    """
    if not ids.numel():
        return
    lo, hi = torch.aminmax(ids)
    if ids.device.type != "cpu":
        torch._assert_async((lo >= 0) & (hi < high), f"{what} must lie in [0, {high})")
    elif lo < 0 or hi >= high:
        raise ValueError(f"{what} must lie in [0, {high}), got [{int(lo)}, {int(hi)}]")


def swiglu_hidden_dim(dim: int, multiple_of: int, dim_multiplier: Optional[float] = None) -> int:
    """LlamaGen's hidden size: int(2/3 * 4 * dim), times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if dim_multiplier is not None:
        hidden = int(dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, then cast back and scaled (as in LlamaGen)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate = Linear(dim, hidden, bias=False)
        self.up = Linear(dim, hidden, bias=False)
        self.down = Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (len(positions), head_dim // 2), float32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


def apply_rope_1d(x_BHLK: torch.Tensor, cos_LK2: torch.Tensor, sin_LK2: torch.Tensor,
                  fast: bool = True) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) by the angles of each position (LlamaGen layout).

    ``fast`` uses :func:`hieratok.nn.rope.rotate_pairs` (a complex multiply for float32 inputs);
    otherwise the rotation is spelled out in float32 (the reference path).
    """
    if fast:
        return rotate_pairs(x_BHLK, cos_LK2, sin_LK2)
    xf = x_BHLK.float().unflatten(-1, (-1, 2))  # (B, H, L, K/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack((a * cos_LK2 - b * sin_LK2, b * cos_LK2 + a * sin_LK2), dim=-1)
    return out.flatten(-2).type_as(x_BHLK)


class KVCache:
    """Preallocated keys and values for every layer, filled left to right.

    ``length`` is the number of positions already written. A forward pass with a cache writes
    its L new positions at ``[length, length + L)`` in every layer and then advances ``length``.

    Args:
        depth: number of layers.
        batch_size: B (2B when guidance runs both halves in one batch).
        num_heads: H.
        max_len: capacity in positions.
        head_dim: K.
        dtype, device: of the stored tensors.
    """

    def __init__(self, depth: int, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        shape = (batch_size, num_heads, max_len, head_dim)
        # uninitialised: positions at or after ``length`` are never read
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0

    def update(self, layer: int, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of ``layer``; return all keys/values so far, (B, H, T, K)."""
        end = self.length + k_BHLK.shape[2]
        self.k[layer][:, :, self.length:end] = k_BHLK
        self.v[layer][:, :, self.length:end] = v_BHLK
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


class SelfAttention(nn.Module):
    """Multi-head attention with a fused qkv projection (q | k | v, head-major), 1D RoPE and a cache."""

    def __init__(self, dim: int, num_heads: int, resid_dropout: float = 0.0, backend: str = "sdpa") -> None:
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.proj = Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.fast_rope = True

    def forward(self, x_BLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask_LT: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope_1d(q, cos, sin, self.fast_rope), apply_rope_1d(k, cos, sin, self.fast_rope)  # (B, H, L, K)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, T, K)
        o_BHLK = attention(q, k, v, mask_LT, self.backend)
        return self.resid_dropout(self.proj(o_BHLK.transpose(1, 2).reshape(B, L, D)))


class GPTBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.resid_dropout, cfg.attn_backend)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        hidden = swiglu_hidden_dim(cfg.dim, cfg.ffn_multiple_of, cfg.ffn_dim_multiplier)
        self.ffn = SwiGLU(cfg.dim, hidden, cfg.ffn_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[KVCache], layer: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.ffn(self.ffn_norm(x))


class GPT(PretrainedMixin, nn.Module):
    """Class-conditional decoder-only transformer over code tokens (and HAR placeholders).

    Inputs are integer ids: ``[0, V)`` are codes, ``V + j`` is placeholder ``j``. When ``labels``
    are given, the class embedding is put in front of the tokens (position 0 of the sequence).
    The output at every input position is a distribution over the V codes.

    Args:
        config: a :class:`GPTConfig`.
    """

    config_class = GPTConfig
    model_type = "llamagen-gpt"
    presets = GPT_PRESETS

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: null class
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.placeholder_embed = nn.Embedding(cfg.num_placeholders, cfg.dim) if cfg.num_placeholders else None
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.skip_full_masks = True
        self.grad_checkpointing = False
        cos, sin = rope_angles(torch.arange(cfg.max_seq_len), cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen init: N(0, init_std) for linear and embedding weights, zero output head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.init_std)
        nn.init.zeros_(self.head.weight)

    @property
    def null_class(self) -> int:
        return self.config.null_class

    def set_fast_paths(self, enabled: bool = True) -> None:
        """Switch the sampling fast paths on (default) or to their reference paths (module docstring)."""
        self.skip_full_masks = enabled
        for m in self.modules():
            if isinstance(m, Linear):
                m.fast = enabled
            elif isinstance(m, SelfAttention):
                m.fast_rope = enabled

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass of training (same results, less memory)."""
        self.grad_checkpointing = enabled

    def set_attn_backend(self, backend: str) -> None:
        """Switch every block to another attention backend (``"sdpa"`` or ``"reference"``)."""
        if backend not in GPT_BACKENDS:
            raise ValueError(f"attn_backend {backend!r} is not one of {GPT_BACKENDS}")
        self.config = dataclasses.replace(self.config, attn_backend=backend)
        for blk in self.blocks:
            blk.attn.backend = backend

    def new_cache(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences of up to ``max_len`` positions."""
        w = self.tok_embed.weight
        return KVCache(self.config.depth, batch_size, self.config.num_heads, max_len, self.config.head_dim,
                       dtype or w.dtype, device if device is not None else w.device)

    def drop_labels(self, labels_B: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``class_dropout`` (training CFG).

        The uniforms are drawn on ``generator``'s device and moved to the labels' device.
        """
        u = rand(labels_B.shape, generator, labels_B.device)
        return torch.where(u < self.config.class_dropout, torch.full_like(labels_B, self.null_class), labels_B)

    def _check_labels(self, labels_B: torch.Tensor, tokens_BL: Optional[torch.Tensor]) -> None:
        """Integer (B,) class ids in ``[0, num_classes]`` (the last is the null class); one check per
        call with labels (the prefill when sampling), not per decoding step."""
        if labels_B.is_floating_point() or labels_B.is_complex() or labels_B.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels_B.dtype}")
        if labels_B.ndim != 1 or (tokens_BL is not None and labels_B.shape[0] != tokens_BL.shape[0]):
            raise ValueError(f"labels must be (B,) with B = the tokens' batch, got {tuple(labels_B.shape)}")
        C = self.config.num_classes
        check_ids(labels_B, C + 1, f"labels ({C} = the null class)")

    def embed_tokens(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Embeddings of code ids and placeholder ids, (B, L, D)."""
        V = self.config.vocab_size
        check_ids(tokens_BL, V + self.config.num_placeholders, f"token ids (codes below {V}, placeholders above)")
        x = self.tok_embed(tokens_BL.clamp(max=V - 1))
        if self.placeholder_embed is None:
            return x
        is_ph = tokens_BL >= V
        return torch.where(is_ph[..., None], self.placeholder_embed((tokens_BL - V).clamp(min=0)), x)

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length <= self.rope_cos.shape[0]:
            return self.rope_cos[start:start + length], self.rope_sin[start:start + length]
        return rope_angles(torch.arange(start, start + length, device=device), self.config.head_dim,
                           self.config.rope_base)

    def forward(
        self,
        tokens_BL: Optional[torch.Tensor],
        labels_B: Optional[torch.Tensor] = None,
        *,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Logits for every input position.

        Args:
            tokens_BL: code / placeholder ids, or None (only the class token, e.g. a prefill).
            labels_B: class ids; when given, the class token is prepended at position 0. In
                training mode they are dropped to the null class with ``class_dropout``.
            mask: bool (L_in, T) mask, True where a query may attend to a key; rows are the new
                positions, columns all positions so far (cached + new). None means causal.
            cache: a :class:`KVCache`; new positions start at ``cache.length``, which advances.
            generator: randomness of the class dropout.

        Returns:
            float32 logits (B, L_in, V), L_in = L (+1 with labels).
        """
        parts = []
        if labels_B is not None:
            self._check_labels(labels_B, tokens_BL)
            if self.training and self.config.class_dropout > 0:
                labels_B = self.drop_labels(labels_B, generator)
            parts.append(self.class_embed(labels_B)[:, None])  # (B, 1, D)
        if tokens_BL is not None:
            parts.append(self.embed_tokens(tokens_BL))
        if not parts:
            raise ValueError("GPT.forward needs tokens, labels or both")
        x_BLD = self.tok_dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        L = x_BLD.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + L > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start} used + {L} new do not fit")
        T = start + L
        if mask is None:
            mask = torch.ones(L, T, dtype=torch.bool, device=x_BLD.device).tril(diagonal=start)
        elif mask.shape != (L, T) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape ({L}, {T}), got {mask.dtype} {tuple(mask.shape)}")
        cos, sin = self._rope(start, L, x_BLD.device)
        attn_mask: Optional[torch.Tensor] = mask
        if cache is not None and self.skip_full_masks and self.config.attn_backend == "sdpa" and bool(mask.all()):
            attn_mask = None  # every query sees every key so far (a block-causal decoding step)
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and cache is None and self.training and torch.is_grad_enabled():
                x_BLD = checkpoint(blk, x_BLD, cos, sin, attn_mask, None, i, use_reentrant=False)
            else:
                x_BLD = blk(x_BLD, cos, sin, attn_mask, cache, i)
        if cache is not None:
            cache.length = T
        return self.head(self.norm(x_BLD)).float()
