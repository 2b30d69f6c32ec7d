"""Convert the authors' ResTok checkpoints (Kwai-Kolors/ResTok, e.g. ``restok_l_128``) to :class:`ResTok`.

The official state dict (their ``modeling/restok.py``) maps to ours with the table
:data:`KEY_MAP`, one row per kind of tensor, ``(official template, our template, op)``:

========================================  =====================================  ============
official                                  ours                                   op
========================================  =====================================  ============
pixel_encoder.* / pixel_decoder.*         same names                             copy
encoder.patch_embed.{weight,bias}         encoder.token_in.{weight,bias}         1x1 conv -> linear
encoder.level_embedding.{s}  (1, D)       encoder.stage_embed  (S, D)            stack rows
encoder.latent_token_level_embedding.{l}  encoder.latent_level_embed  (V, D)     stack rows
encoder.ln_pre / ln_post                  encoder.norm_pre / norm_post           copy
{enc,dec}.blocks.{i}.gamma_1 / gamma_2    {enc,dec}.blocks.{i}.layer_scale1 / 2  copy
{enc,dec}.blocks.{i}.(norm*, attn.*, mlp.*)  same names                          copy
encoder.conv_out.{l}.weight (d, D, 1, 1)  encoder.level_out.{l}.weight (d, D)    1x1 conv -> linear
quantize.embedding.weight                 quantizer.embedding.weight             copy
decoder.latent_mask_token  (1, 1, d)      decoder.latent_mask_token  (d,)        flatten
decoder.mask_token / feat_mask_token      decoder.image_query / align_query      flatten
decoder.decoder_embed.{l}.*               decoder.level_in.{l}.*                 copy
decoder.latent_token_level_embedding.{l}  decoder.latent_level_embed             stack rows
decoder.ffn.{weight,bias}                 decoder.token_out.{weight,bias}        1x1 conv -> linear
vf_proj.weight / vf_proj_dec.weight       encoder_align / decoder_align .weight  1x1 conv -> linear
========================================  =====================================  ============

Dropped on purpose: ``foundation_model.*`` (the frozen DINOv3 the training run kept inside the
model; not part of the tokenizer) and all-zero ``attn.k_bias`` buffers. ``_orig_mod.`` (torch
compile) and ``module.`` (DDP) prefixes are stripped. Any other key, and any of our keys left
without a source, is an error that names every such key.

Supported: the release's architecture family (CNN front end, per-level projections,
``is_legacy`` latent layout, learned decoder queries). Checkpoints of other variants (a
patch-embedding front end, one shared projection, ...) fail with the unmatched keys named.

Legend: D width, S image stages, V latent levels, d code dim.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Optional, Union

import torch

from ..hub import meta_shapes, state_dict_problems
from ..tokenizers.restok import ResTok, ResTokConfig
from .checkpoints import load_official_state_dict

__all__ = [
    "KEY_MAP", "load_official_state_dict", "convert_restok_checkpoint", "to_official_state_dict",
    "infer_restok_config", "load_official_restok",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

COPY, CONV1X1, FLATTEN, STACK = "copy", "1x1 conv -> linear", "flatten", "stack rows"

_BLOCK_SAME = (r"(?:norm1|norm2|attn\.q_norm|attn\.k_norm|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
               r"|attn\.qkv\.weight|attn\.q_bias|attn\.v_bias")
_FIELDS = {"i": r"\d+", "s": r"encoder|decoder", "rest": r".+", "blk": _BLOCK_SAME, "wb": r"weight|bias"}

KEY_MAP: list[tuple[str, str, str]] = [
    ("pixel_encoder.{rest}", "pixel_encoder.{rest}", COPY),
    ("pixel_decoder.{rest}", "pixel_decoder.{rest}", COPY),
    ("encoder.patch_embed.weight", "encoder.token_in.weight", CONV1X1),
    ("encoder.patch_embed.bias", "encoder.token_in.bias", COPY),
    ("encoder.level_embedding.{i}", "encoder.stage_embed", STACK),
    ("{s}.latent_token_level_embedding.{i}", "{s}.latent_level_embed", STACK),
    ("{s}.ln_pre.{wb}", "{s}.norm_pre.{wb}", COPY),
    ("{s}.ln_post.{wb}", "{s}.norm_post.{wb}", COPY),
    ("{s}.blocks.{i}.gamma_1", "{s}.blocks.{i}.layer_scale1", COPY),
    ("{s}.blocks.{i}.gamma_2", "{s}.blocks.{i}.layer_scale2", COPY),
    ("{s}.blocks.{i}.{blk}", "{s}.blocks.{i}.{blk}", COPY),
    ("encoder.conv_out.{i}.weight", "encoder.level_out.{i}.weight", CONV1X1),
    ("encoder.conv_out.{i}.bias", "encoder.level_out.{i}.bias", COPY),
    ("quantize.embedding.weight", "quantizer.embedding.weight", COPY),
    ("decoder.latent_mask_token", "decoder.latent_mask_token", FLATTEN),
    ("decoder.mask_token", "decoder.image_query", FLATTEN),
    ("decoder.feat_mask_token", "decoder.align_query", FLATTEN),
    ("decoder.decoder_embed.{i}.{wb}", "decoder.level_in.{i}.{wb}", COPY),
    ("decoder.ffn.weight", "decoder.token_out.weight", CONV1X1),
    ("decoder.ffn.bias", "decoder.token_out.bias", COPY),
    ("vf_proj.weight", "encoder_align.weight", CONV1X1),
    ("vf_proj_dec.weight", "decoder_align.weight", CONV1X1),
]

DROPPED_PREFIXES = ("foundation_model.",)
STRIPPED_PREFIXES = ("_orig_mod.", "module.")


def _compile(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{_FIELDS[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + r"\Z")


_FORWARD = [(_compile(a), b, op, a) for a, b, op in KEY_MAP]
_BACKWARD = [(_compile(b), a, op) for a, b, op in KEY_MAP]


# --------------------------------------------------------------------------------------------
# loading files
# --------------------------------------------------------------------------------------------


def _clean(sd: Mapping[str, torch.Tensor]) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        for pre in STRIPPED_PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
        if k.startswith(DROPPED_PREFIXES):
            continue
        if k.endswith(".attn.k_bias"):  # non-persistent zeros in the official code; nothing to load
            if bool(v.any()):
                raise ValueError(f"{k} is not zero; this checkpoint has a key bias our model does not have")
            continue
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def _map_official(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Apply :data:`KEY_MAP`; returns (our state dict, official keys no rule matched)."""
    out: StateDict = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    unmatched = []
    for k, v in sd.items():
        for rx, target, op, _ in _FORWARD:
            m = rx.match(k)
            if m is None:
                continue
            name = target.format(**m.groupdict())
            if op == STACK:
                stacks.setdefault(name, {})[int(m.group("i"))] = v.reshape(-1)
            elif op == CONV1X1:
                if v.ndim != 4 or v.shape[-2:] != (1, 1):
                    raise ValueError(f"{k}: expected a 1x1 convolution weight, got shape {tuple(v.shape)}")
                out[name] = v[:, :, 0, 0]
            elif op == FLATTEN:
                out[name] = v.reshape(-1)
            else:
                out[name] = v
            break
        else:
            unmatched.append(k)
    for name, rows in stacks.items():
        if sorted(rows) != list(range(len(rows))):
            raise ValueError(f"{name}: official rows {sorted(rows)} are not 0..{len(rows) - 1}")
        out[name] = torch.stack([rows[i] for i in range(len(rows))])
    return out, unmatched


def convert_restok_checkpoint(source: Source, config: Optional[ResTokConfig] = None, **overrides: Any) -> StateDict:
    """Official ResTok weights -> a state dict for :class:`ResTok`.

    Args:
        source: a checkpoint path (see :func:`load_official_state_dict`) or an official state dict.
        config: our config to check against; ``None`` infers it (:func:`infer_restok_config`,
            with ``overrides`` such as ``image_size``).

    Raises:
        ValueError: naming every official key without a mapping, every key of ours the
            checkpoint does not provide, and every shape mismatch.
    """
    raw = load_official_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    sd = _clean(raw)
    dropped = sorted(k for k in raw if k.startswith(DROPPED_PREFIXES))
    if dropped:
        logger.info("ResTok conversion: dropped %d foundation-model tensors (%s...)", len(dropped), dropped[0])
    if config is None:
        config = infer_restok_config(sd, **overrides)
    elif overrides:
        raise ValueError("pass either a config or field overrides, not both")
    ours, unmatched = _map_official(sd)
    want = meta_shapes(ResTok, config)
    problems = [f"official keys with no mapping ({len(unmatched)}): {sorted(unmatched)}"] if unmatched else []
    problems += state_dict_problems({k: v.shape for k, v in ours.items()}, want)
    if problems:
        raise ValueError("cannot convert this ResTok checkpoint: " + " | ".join(problems))
    return {k: ours[k].contiguous() for k in want}


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Our state dict -> the official layout (the inverse of :func:`convert_restok_checkpoint`'s mapping)."""
    out: StateDict = {}
    for k, v in state_dict.items():
        for rx, template, op in _BACKWARD:
            m = rx.match(k)
            if m is None:
                continue
            g = m.groupdict()
            if op == STACK:
                for i in range(v.shape[0]):
                    out[template.format(**{**g, "i": str(i)})] = v[i].reshape(1, -1).clone()
            elif op == CONV1X1:
                out[template.format(**g)] = v[:, :, None, None].clone()
            elif op == FLATTEN:
                out[template.format(**g)] = v.reshape(1, 1, -1).clone()
            else:
                out[template.format(**g)] = v.clone()
            break
        else:
            raise ValueError(f"{k}: no official name for this key")
    return out


# --------------------------------------------------------------------------------------------
# config inference and one-call loading
# --------------------------------------------------------------------------------------------


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def infer_restok_config(sd: Mapping[str, torch.Tensor], image_size: int = 256, **overrides: Any) -> ResTokConfig:
    """Our config for an official state dict, read off tensor shapes and counts.

    ``image_size`` is not stored in the weights (the network is convolutional plus RoPE); the
    release used 256. Fields the weights do not determine (``legacy_latent_layout`` and
    ``min_latent_tokens``) take the release's values unless overridden.
    """
    sd = _clean(sd)
    n_res = _count(sd, r"pixel_encoder\.down\.(\d+)\.")
    need = ["pixel_encoder.conv_in.weight", "encoder.ln_pre.weight", "decoder.ln_pre.weight",
            "encoder.blocks.0.attn.q_norm.weight", "decoder.blocks.0.attn.q_norm.weight", "quantize.embedding.weight",
            "encoder.patch_embed.weight", "encoder.blocks.0.mlp.fc1.weight", "encoder.latent_token_level_embedding.0",
            *(f"pixel_encoder.down.{i}.block.0.conv1.weight" for i in range(max(n_res, 1)))]
    absent = [k for k in need if k not in sd]  # every tensor read below, so that none is a KeyError
    if absent:
        raise ValueError(f"not a complete official ResTok state dict: missing {absent}")
    ch = sd["pixel_encoder.conv_in.weight"].shape[0]
    mult = tuple(int(sd[f"pixel_encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(n_res))
    enc_w, dec_w = sd["encoder.ln_pre.weight"].shape[0], sd["decoder.ln_pre.weight"].shape[0]
    K, d = sd["quantize.embedding.weight"].shape
    levels = _count(sd, r"encoder\.latent_token_level_embedding\.(\d+)\Z")
    fields: dict[str, Any] = dict(
        image_size=image_size,
        cnn_channels=ch, cnn_channel_mult=mult, cnn_res_blocks=_count(sd, r"pixel_encoder\.down\.0\.block\.(\d+)\."),
        cnn_z_channels=sd["encoder.patch_embed.weight"].shape[1],
        encoder_width=enc_w, encoder_depth=_count(sd, r"encoder\.blocks\.(\d+)\."),
        encoder_heads=enc_w // sd["encoder.blocks.0.attn.q_norm.weight"].shape[0],
        decoder_width=dec_w, decoder_depth=_count(sd, r"decoder\.blocks\.(\d+)\."),
        decoder_heads=dec_w // sd["decoder.blocks.0.attn.q_norm.weight"].shape[0],
        mlp_ratio=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0] / enc_w,
        hierarchy_stages=_count(sd, r"encoder\.level_embedding\.(\d+)\Z"),
        num_latent_tokens=2 ** (levels - 1), codebook_size=K, codebook_dim=d,
        encoder_alignment="vf_proj.weight" in sd, decoder_alignment="vf_proj_dec.weight" in sd,
    )
    if "vf_proj.weight" in sd or "vf_proj_dec.weight" in sd:
        fields["alignment_dim"] = sd.get("vf_proj.weight", sd.get("vf_proj_dec.weight")).shape[0]
    return ResTok.preset_config("restok-l-128", **{**fields, **overrides})


def load_official_restok(source: Source, config: Optional[ResTokConfig] = None, **overrides: Any) -> ResTok:
    """Build a :class:`ResTok` holding official weights (config inferred unless given)."""
    raw = load_official_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    cfg = config if config is not None else infer_restok_config(raw, **overrides)
    sd = convert_restok_checkpoint(raw, cfg)
    model = ResTok(cfg)
    model.load_state_dict(sd)
    return model.eval()
