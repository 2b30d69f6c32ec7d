"""Load the authors' LlamaGen / ResTok-HAR GPT checkpoints into :class:`hieratok.generators.llamagen.GPT`.

The released ResTok generator (``llamagen_l_c2i_restok_l_128.r256_in1k``, GPT-L, 326M) uses
LlamaGen's parameter names. The mapping is one-to-one (no tensor is split or transposed):

    cls_embedding.embedding_table.weight            -> class_embed.weight   (num_classes + 1 rows)
    tok_embeddings.weight                           -> tok_embed.weight
    spe_tok_embeddings.special_embeddings.weight    -> placeholder_embed.weight  (HAR only)
    layers.N.attention_norm.weight                  -> blocks.N.attn_norm.weight
    layers.N.attention.wqkv.weight                  -> blocks.N.attn.qkv.weight  (q | k | v rows)
    layers.N.attention.wo.weight                    -> blocks.N.attn.proj.weight
    layers.N.ffn_norm.weight                        -> blocks.N.ffn_norm.weight
    layers.N.feed_forward.w1 / w3 / w2.weight       -> blocks.N.ffn.gate / up / down.weight
    norm.weight, output.weight                      -> norm.weight, head.weight

``torch.compile`` / DDP prefixes (``_orig_mod.``, ``module.``) are stripped; the RoPE table
``freqs_cis``, KV-cache buffers and cached masks, which some checkpoints carry, are ignored.
Both models use 1D RoPE on adjacent channel pairs with the class token at position 0 (ResTok's
variant). LlamaGen's own image-grid models use 2D RoPE and are not supported; their weights have
the same names and shapes, so nothing here can tell them apart: such a checkpoint loads, but its
samples are wrong. The authors' ``config.json`` is checked: one class token (``cls_token_num``)
and, for HAR, ``block_size`` codes laid out with ``ar_token_num`` next-token codes must fit the
``spe_token_num`` placeholders; ``block_size`` sets the RoPE table length.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..generators.autoregressive import har_layout
from ..generators.llamagen import GPT, GPTConfig, swiglu_hidden_dim
from ..hub import meta_shapes, state_dict_problems
from .checkpoints import checkpoint_file, load_official_state_dict, unwrap_state_dict

__all__ = ["llamagen_key_map", "convert_llamagen_state_dict", "to_official_gpt_state_dict",
           "gpt_config_from_official", "infer_gpt_config", "load_llamagen_gpt"]
log = logging.getLogger(__name__)

_PREFIXES = ("_orig_mod.", "module.")
_IGNORED = re.compile(r"^(freqs_cis|causal_mask|.*\.kv_cache\.[kv]_cache)$")
_GLOBAL = {
    "cls_embedding.embedding_table.weight": "class_embed.weight",
    "tok_embeddings.weight": "tok_embed.weight",
    "spe_tok_embeddings.special_embeddings.weight": "placeholder_embed.weight",
    "norm.weight": "norm.weight",
    "output.weight": "head.weight",
}
_PER_LAYER = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wqkv.weight": "attn.qkv.weight",
    "attention.wo.weight": "attn.proj.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn.gate.weight",
    "feed_forward.w3.weight": "ffn.up.weight",
    "feed_forward.w2.weight": "ffn.down.weight",
}


def llamagen_key_map(config: GPTConfig) -> dict[str, str]:
    """Official parameter name -> our parameter name, for a model of ``config``."""
    out = {k: v for k, v in _GLOBAL.items() if config.num_placeholders or not k.startswith("spe_")}
    for i in range(config.depth):
        out.update({f"layers.{i}.{k}": f"blocks.{i}.{v}" for k, v in _PER_LAYER.items()})
    return out


def _unwrap(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Take the weights out of a training checkpoint (``{"model": ...}`` etc.) and strip prefixes."""
    sd = unwrap_state_dict(sd)
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def convert_llamagen_state_dict(state_dict: Mapping[str, Any], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename an official state dict to ours and check it against ``config``.

    Raises:
        ValueError: naming every official key that maps to nothing, every parameter of ours
            that the checkpoint lacks, and every shape that does not fit.
    """
    sd = {k: v for k, v in _unwrap(state_dict).items() if not _IGNORED.match(k)}
    key_map = llamagen_key_map(config)
    unmatched = sorted(k for k in sd if k not in key_map)
    out = {key_map[k]: v for k, v in sd.items() if k in key_map}
    problems = [f"{len(unmatched)} checkpoint key(s) match no GPT parameter: {unmatched}"] if unmatched else []
    problems += state_dict_problems({k: v.shape for k, v in out.items()}, meta_shapes(GPT, config),
                                    labels={ours: f"{ours} (official {off})" for off, ours in key_map.items()})
    if problems:
        raise ValueError("official LlamaGen checkpoint does not fit this GPT config: " + "; ".join(problems))
    return out


def to_official_gpt_state_dict(state_dict: Mapping[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_llamagen_state_dict` (our names -> official names)."""
    inverse = {v: k for k, v in llamagen_key_map(config).items()}
    unmatched = sorted(k for k in state_dict if k not in inverse)
    if unmatched:
        raise ValueError(f"{len(unmatched)} key(s) have no official name: {unmatched}")
    return {inverse[k]: v for k, v in state_dict.items()}


def gpt_config_from_official(official: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """GPTConfig from the authors' ``config.json`` / ``ModelArgs`` fields (dim, n_layer, n_head, ...)."""
    if official.get("n_kv_head") not in (None, official.get("n_head")):
        raise ValueError("grouped-query attention (n_kv_head != n_head) is not supported")
    if official.get("model_type", "c2i") != "c2i":
        raise ValueError(f"only class-conditional (c2i) models are supported, got {official.get('model_type')!r}")
    if official.get("cls_token_num", 1) != 1:
        raise ValueError(f"cls_token_num={official['cls_token_num']}: only one class token (position 0) is supported")
    block, ar, spe = official.get("block_size"), official.get("ar_token_num"), official.get("spe_token_num", 0)
    if ar is not None and block is not None and spe:
        need = har_layout(block, ar).num_placeholders  # ValueError unless block_size = ar_token_num * 2^k
        if need > spe:
            raise ValueError(f"block_size={block} with ar_token_num={ar} needs {need} placeholders, spe_token_num={spe}")
    fields = dict(
        vocab_size=official.get("vocab_size", 16384), dim=official.get("dim", 4096),
        depth=official.get("n_layer", 32), num_heads=official.get("n_head", 32),
        num_classes=official.get("num_classes", 1000), num_placeholders=official.get("spe_token_num", 0),
        ffn_multiple_of=official.get("multiple_of", 256), ffn_dim_multiplier=official.get("ffn_dim_multiplier"),
        norm_eps=official.get("norm_eps", 1e-5), rope_base=float(official.get("rope_base", 10000)),
    )
    if block is not None:
        fields["max_seq_len"] = block
    return GPTConfig(**{**fields, **overrides})


def infer_gpt_config(state_dict: Mapping[str, Any], head_dim: int = 64, **overrides: Any) -> GPTConfig:
    """GPTConfig read off the tensor shapes of an official state dict (LlamaGen heads are 64 wide)."""
    sd = _unwrap(state_dict)
    try:
        vocab, dim = sd["tok_embeddings.weight"].shape
        classes = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a LlamaGen GPT state dict: no {e.args[0]!r}") from None
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    spe = sd.get("spe_tok_embeddings.special_embeddings.weight")
    multiple = next((m for m in (256, 128, 64, 32, 16, 8, 1) if swiglu_hidden_dim(dim, m) == hidden), None)
    if multiple is None:
        raise ValueError(f"feed-forward width {hidden} does not follow LlamaGen's rule for width {dim}; pass a config")
    fields = dict(vocab_size=vocab, dim=dim, depth=depth, num_heads=dim // head_dim, num_classes=classes,
                  num_placeholders=0 if spe is None else spe.shape[0], ffn_multiple_of=multiple)
    return GPTConfig(**{**fields, **overrides})


def load_llamagen_gpt(path: str | Path, config: Optional[GPTConfig] = None, **overrides: Any) -> GPT:
    """Build a :class:`GPT` from an official checkpoint file or Hub-style directory.

    Args:
        path: a ``.safetensors`` / ``.bin`` / ``.pt`` file, or a directory holding
            ``model.safetensors`` or ``pytorch_model.bin`` (and optionally the authors' ``config.json``).
        config: the architecture; if None it comes from the directory's ``config.json`` or,
            failing that, from the tensor shapes.
        overrides: runtime config fields (e.g. ``attn_backend="reference"``).

    Returns:
        The model in eval mode.
    """
    p = Path(path).expanduser()
    official_cfg: Optional[dict[str, Any]] = None
    if p.is_dir():
        if (p / "config.json").is_file():
            official_cfg = json.loads((p / "config.json").read_text())
            official_cfg = official_cfg.get("config", official_cfg)  # hub mixins may nest it
    p = checkpoint_file(p)
    sd = load_official_state_dict(p)
    if config is None:
        config = gpt_config_from_official(official_cfg, **overrides) if official_cfg and "dim" in official_cfg \
            else infer_gpt_config(sd, **overrides)
    elif overrides:
        config = GPTConfig(**{**config.__dict__, **overrides})
    model = GPT(config)
    model.load_state_dict(convert_llamagen_state_dict(sd, config))
    log.info("loaded official LlamaGen GPT from %s (%d layers, width %d)", p, config.depth, config.dim)
    return model.eval()
