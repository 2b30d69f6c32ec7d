"""The building blocks: one transformer toolkit (attention, structural masks, RoPE, MLPs, norms,
block stacks), patching, positional embeddings, convolutional auto-encoder parts."""

from .attention import ATTENTION_BACKENDS, Attention, KVCache, attention_reference, resolve_mask
from .masks import ATTENTION_MODES, MaskSpec
from .mlp import Mlp, SwiGLU
from .norm import LayerNorm2d, RMSNorm
from .patch import PatchEmbed, unpatchify
from .pos_embed import MultiScalePosEmbed, resample_grid
from .transformer import Block, DropPath, Transformer, checkpointed, set_attention_backend, set_fast_paths

__all__ = [
    "ATTENTION_BACKENDS", "ATTENTION_MODES", "Attention", "KVCache", "attention_reference", "resolve_mask",
    "MaskSpec", "Mlp", "SwiGLU", "LayerNorm2d", "RMSNorm", "PatchEmbed", "unpatchify", "MultiScalePosEmbed", "resample_grid",
    "Block", "DropPath", "Transformer", "checkpointed", "set_attention_backend", "set_fast_paths",
]
