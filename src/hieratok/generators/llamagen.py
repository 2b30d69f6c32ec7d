"""LlamaGen-style class-conditional GPT (decoder-only transformer) for 1D code sequences.

The generator of ResTok (arXiv 2601.03955, sec. 3.4) is LlamaGen's GPT: pre-norm blocks with
RMSNorm, a SwiGLU feed-forward net, 1D rotary position embeddings and a class embedding that
occupies the first position of the sequence. The null class (id ``num_classes``) is the
unconditional input for classifier-free guidance. For next-hierarchy prediction (HAR) the model
also has a table of learned placeholder embeddings; a token id ``vocab_size + j`` in the input
stands for placeholder ``j``. What the sequence looks like and which positions see which is
decided by :mod:`hieratok.generators.autoregressive`; this file only knows tokens, positions and masks.

Positions follow ResTok's variant of LlamaGen: 1D RoPE with the class token at position 0 and the
token at sequence index i at position i (LlamaGen's own class-to-image model used 2D RoPE).

Decoding uses :class:`KVCache`: preallocated keys and values per layer, a prefill and then steps
of any number of new tokens, each with its own rows of the attention mask.

Fast paths for sampling on CPU (:meth:`GPT.set_fast_paths` switches them to their reference
paths; parity: tests/generators/autoregressive/test_gpt_fast_paths.py): the linear layers keep their weights prepacked
for the CPU's faster packed gemm, MKL's or oneDNN's (:class:`hieratok.nn.linear.Linear`), RoPE rotates the channel pairs as one complex
multiply (:func:`hieratok.nn.rope.rotate_pairs`), and a mask whose rows see every key so far
(every step of a block-causal layout) runs as unmasked attention.

Legend: B batch, L new tokens, T cached + new tokens, D width, H heads, K head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..config import require_positive_ints, runtime_field
from ..hub import PretrainedMixin
from ..nn.attention import Attention, KVCache, MaskLike, check_backend
from ..nn.linear import Linear
from ..nn.masks import MaskSpec
from ..nn.mlp import SwiGLU, swiglu_hidden_dim
from ..nn.norm import RMSNorm
from ..nn.rope import Table, rope_table
from ..nn.transformer import checkpointed, set_attention_backend, set_fast_paths
from ..presets import GPT_PRESETS
from .latents import rand

__all__ = ["GPTConfig", "GPT", "KVCache", "check_ids"]


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
        attn_backend: ``"sdpa"``, ``"reference"`` or ``"flex"`` (see :mod:`hieratok.nn.attention`).
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
        check_backend(self.attn_backend)
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


class GPTBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; attention with 1D RoPE and
    no biases (q | k | v fused, head-major), linears prepacked for CPU decoding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads, qkv_bias=False, proj_bias=False, proj_dropout=cfg.resid_dropout,
                              linear=Linear, backend=cfg.attn_backend)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        hidden = swiglu_hidden_dim(cfg.dim, cfg.ffn_multiple_of, cfg.ffn_dim_multiplier)
        self.ffn = SwiGLU(cfg.dim, hidden, cfg.ffn_dropout)

    def forward(self, x: torch.Tensor, rope: Table, mask: MaskLike, cache: Optional[KVCache], layer: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask, rope=rope, cache=cache, layer=layer)
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
        self.grad_checkpointing = False
        cos, sin = self._rope_table(torch.arange(cfg.max_seq_len))
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
        set_fast_paths(self, enabled)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass of training (same results, less memory)."""
        self.grad_checkpointing = enabled

    def set_attn_backend(self, backend: str) -> None:
        """Switch every block to another attention backend (``"sdpa"``, ``"reference"`` or ``"flex"``)."""
        self.config = dataclasses.replace(self.config, attn_backend=check_backend(backend))
        set_attention_backend(self, backend)

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

    def _rope_table(self, positions: torch.Tensor) -> Table:
        # LlamaGen computes the angles in float32; its weights were trained with those
        return rope_table(positions, [self.config.head_dim], self.config.rope_base, dtype=torch.float32)

    def _rope(self, start: int, length: int, device: torch.device) -> Table:
        if start + length <= self.rope_cos.shape[0]:
            return self.rope_cos[start:start + length], self.rope_sin[start:start + length]
        return self._rope_table(torch.arange(start, start + length, device=device))

    def forward(
        self,
        tokens_BL: Optional[torch.Tensor],
        labels_B: Optional[torch.Tensor] = None,
        *,
        mask: Union[None, MaskSpec, torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Logits for every input position.

        Args:
            tokens_BL: code / placeholder ids, or None (only the class token, e.g. a prefill).
            labels_B: class ids; when given, the class token is prepended at position 0. In
                training mode they are dropped to the null class with ``class_dropout``.
            mask: a :class:`MaskSpec` over the whole sequence (e.g. a HAR layout's groups), whose rows
                ``[cache.length, T)`` these positions are, or a bool (L_in, T) tensor, True where a
                query may attend to a key (rows the new positions, columns all positions so far:
                cached + new). None means causal.
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
            mask = MaskSpec.causal(T)
        elif isinstance(mask, MaskSpec):
            if mask.length < T or mask.key_end(start, T) != T:
                raise ValueError(f"mask over {mask.length} positions does not cover the rows [{start}, {T}) with "
                                 f"exactly the {T} keys so far (steps must end at a block end)")
        elif not isinstance(mask, torch.Tensor) or mask.shape != (L, T) or mask.dtype != torch.bool:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a MaskSpec or a bool tensor of shape ({L}, {T}), got {got}")
        rope = self._rope(start, L, x_BLD.device)
        for i, blk in enumerate(self.blocks):
            ckpt = self.grad_checkpointing and cache is None and self.training
            x_BLD = checkpointed(ckpt, blk, x_BLD, rope, mask, cache, i)
        if cache is not None:
            cache.length = T
        return self.head(self.norm(x_BLD)).float()
