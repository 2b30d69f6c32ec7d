"""Converters from released third-party checkpoints (ResTok, its LlamaGen HAR generator) to our modules."""

from .checkpoints import load_official_state_dict
from .llamagen import convert_llamagen_state_dict, infer_gpt_config, load_llamagen_gpt, to_official_gpt_state_dict
from .restok import convert_restok_checkpoint, infer_restok_config, load_official_restok, to_official_state_dict

__all__ = ["load_official_state_dict", "convert_restok_checkpoint", "infer_restok_config", "load_official_restok", "to_official_state_dict",
           "convert_llamagen_state_dict", "infer_gpt_config", "load_llamagen_gpt", "to_official_gpt_state_dict"]
