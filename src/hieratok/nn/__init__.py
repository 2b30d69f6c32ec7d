"""Reusable neural-network blocks: attention, masks, positional embeddings, patching, ViT blocks."""

from .attention import ATTENTION_BACKENDS, Attention, attention_reference
from .masks import ATTENTION_MODES, allowed_fraction, dense_mask, mask_mod, scale_ids
from .norm import LayerNorm2d
from .patch import PatchEmbed, unpatchify
from .pos_embed import MultiScalePosEmbed
from .vit import Block, DropPath, Mlp, Transformer

__all__ = [
    "ATTENTION_BACKENDS", "ATTENTION_MODES", "Attention", "attention_reference", "allowed_fraction",
    "dense_mask", "mask_mod", "scale_ids", "PatchEmbed", "unpatchify", "MultiScalePosEmbed",
    "Block", "DropPath", "Mlp", "Transformer", "LayerNorm2d",
]
