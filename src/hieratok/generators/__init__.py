"""Generators on tokenizer latents and codes: DiT (adaLN-Zero) with a Gaussian-diffusion or a
flow-matching objective, and a LlamaGen GPT with next-token or next-hierarchy (HAR) prediction.

    model = DiT(DiT.preset_config("dit-xl", **LatentNormalizer.from_latents(z_cache).config_fields()))
    objective = GeneratorObjective(kind="diffusion")            # or kind="flow" with learn_sigma=False
    loss = training_loss(model, objective, z_BCHW, y_B, generator)["loss"]
    z = sample_latents(model, objective, y_B, cfg_scale=4.0, generator=g)   # tokenizer latents
"""

from .autoregressive import (
    SequenceLayout,
    ar_layout,
    ar_sample,
    cfg_scale_at,
    filter_logits,
    grouped_layout,
    har_layout,
    har_sample,
    sample_layout,
    sample_logits,
    sequence_loss,
    training_batch,
)
from .diffusion import GaussianDiffusion, linear_beta_schedule, space_timesteps
from .dit import DIT_PRESETS, DiT, DiTConfig, count_parameters, sincos_pos_embed_2d, timestep_embedding
from .flow import FlowMatching
from .latents import LatentNormalizer
from .llamagen import GPT, GPT_PRESETS, GPTConfig, KVCache
from .objective import GeneratorObjective, build_process, guided_model_fn, sample_latents, training_loss

__all__ = [
    "DiT", "DiTConfig", "DIT_PRESETS", "count_parameters",
    "timestep_embedding", "sincos_pos_embed_2d", "GaussianDiffusion", "linear_beta_schedule", "space_timesteps",
    "FlowMatching", "LatentNormalizer", "GeneratorObjective", "build_process", "guided_model_fn", "sample_latents",
    "training_loss",
    "GPT", "GPTConfig", "KVCache", "GPT_PRESETS", "SequenceLayout", "har_layout",
    "ar_layout", "grouped_layout", "training_batch", "sequence_loss", "sample_layout", "har_sample", "ar_sample",
    "filter_logits", "sample_logits", "cfg_scale_at",
]
