"""Training: config, trainer loop, tasks, parallelism, EMA and checkpoints."""

from .config import DataConfig, GANConfig, OptimConfig, TrainConfig, VFConfig, apply_overrides, load_config
from .trainer import NonFiniteLossError, Trainer, lr_at

__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "GANConfig", "VFConfig", "apply_overrides", "load_config", "Trainer",
           "NonFiniteLossError", "lr_at"]
