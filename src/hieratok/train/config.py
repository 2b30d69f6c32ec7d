"""Training configuration: nested dataclasses, YAML files and dotted ``key=value`` overrides.

    hieratok train --preset tiny optim.lr=2e-4 loss.kl=1e-5 model.scales=[1,2,4,8] steps=500

The resolved config is written to ``<run>/train_config.yaml`` and into every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

from ..config import coerce_value
from ..losses.gan import GANConfig
from ..losses.reconstruction import ReconLossConfig

__all__ = ["DataConfig", "OptimConfig", "GANConfig", "VFConfig", "TrainConfig", "TokenizerTrainConfig",
           "GeneratorTrainConfig", "TASK_CONFIGS", "task_name", "apply_overrides", "load_config", "config_dict"]


@dataclass
class DataConfig:
    """Where images come from. ``path=None`` uses the embedded photos shipped by installed packages."""

    path: Optional[str] = None
    num_workers: Optional[int] = None  # None: min(8, CPUs per local rank) on CUDA, 0 (the main process) on CPU
    samples_per_epoch: int = 1024  # embedded photos only
    short_side: Optional[int] = None  # embedded photos only: rescale short side first (crops see more of the scene)
    random_resized_crop_scale: Optional[tuple[float, float]] = None  # None: ADM centre crop (+ flip)
    hflip: bool = True
    # aspect-ratio buckets, [[height, width], ...]: every batch is one bucket's shape (drawn equally often,
    # random resized crops of that aspect for folders, native crops of the embedded photos); None: the
    # model's square image_size. e.g. data.buckets=[[64,64],[64,96],[96,64]]
    buckets: Optional[tuple[tuple[int, int], ...]] = None

    def __post_init__(self) -> None:
        if self.buckets is not None:
            self.buckets = tuple(tuple(b) for b in self.buckets)
            if not self.buckets or any(len(b) != 2 or not all(isinstance(v, int) and v > 0 for v in b) for b in self.buckets):
                raise ValueError(f"data.buckets must be a list of [height, width] positive ints, got {self.buckets!r}")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (paper appendix E)."""

    lr: float = 1e-4
    end_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_ratio: float = 0.03
    warmup_steps: Optional[int] = None  # linear warm-up length in steps; when set, replaces warmup_ratio (task restok)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int)
                                              or self.warmup_steps < 0):
            raise ValueError(f"optim.warmup_steps must be an integer >= 0 or null, got {self.warmup_steps!r}")

    def warmup_fraction(self, total_steps: int) -> float:
        """Warm-up as a fraction of ``total_steps``: ``warmup_steps / total_steps`` when set, else ``warmup_ratio``."""
        return self.warmup_ratio if self.warmup_steps is None else self.warmup_steps / max(1, total_steps)


@dataclass
class VFConfig:
    """VA-VAE vision-foundation alignment of the latent (optional; 0 weight = off)."""

    weight: float = 0.0  # VA-VAE uses 0.1 with adaptive weighting
    encoder: str = "effnet-lite0"  # "effnet-lite0" (offline), "dinov2", "clip" or "torchscript" (needs path)
    path: Optional[str] = None  # the frozen encoder's file, where the kind needs one
    margin_cos: float = 0.5
    margin_dm: float = 0.25
    adaptive: bool = True


PRECISIONS = ("auto", "fp32", "bf16")


def _non_finite_floats(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every float field (also inside tuples and nested configs) that is NaN or infinite."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cfg):
        v, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            out += _non_finite_floats(v, key + ".")
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, float) and not math.isfinite(x):
                out.append((key, v))
                break
    return out


@dataclass
class TrainConfig:
    """What every training run needs, whatever its task; saved with the run. Each task adds its own
    section (:class:`TokenizerTrainConfig`, :class:`GeneratorTrainConfig`)."""

    task: str = "hieratok"  # see TASK_CONFIGS: "hieratok", "restok" (tokenizers), "dit", "ar" (generators)
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides, e.g. {"scales": [1, 2, 4]}
    init_from: Optional[str] = None  # a saved model folder to start from (e.g. stage 1 for stage 2)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 8  # per rank, per micro-step
    steps: int = 1000
    seed: int = 0
    out_dir: str = "runs/tokenizer"
    log_every: int = 10
    image_every: int = 200
    ckpt_every: int = 500
    keep_last: int = 3
    ema_decay: float = 0.999  # 0 disables EMA weights
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    compile: bool = False
    grad_checkpointing: bool = False
    # CPU: switch between one thread and all cores when another process stalls the all-core steps
    # (train/threads.py). Thread counts change float rounding (~1e-7): false gives bit-exact reruns
    adapt_threads: bool = True
    # CPU: keep freed tensor memory in the process (machine.keep_freed_memory: glibc, process-wide);
    # false leaves glibc's defaults, which page-fault the activations in again on every step
    keep_freed_memory: bool = True
    fsdp: bool = False
    max_nonfinite: int = 5  # consecutive skipped steps before the run stops
    tensorboard: bool = True
    wandb: bool = False
    # wandb run identity; the run id goes to <out>/wandb.json so a resumed run continues the same wandb run
    wandb_project: str = "hieratok"
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None  # default: the run folder's name
    progress: bool = True

    def __post_init__(self) -> None:
        bad = _non_finite_floats(self)
        if bad:
            raise ValueError(f"config key {bad[0][0]!r} must be a finite number, got {bad[0][1]!r}")
        if self.task not in TASK_CONFIGS or type(self) is not TASK_CONFIGS[self.task]:
            want = TASK_CONFIGS.get(self.task)
            raise ValueError(f"task {self.task!r} " + (f"takes a {want.__name__}, not a {type(self).__name__}" if want
                             else f"is not one of {sorted(TASK_CONFIGS)}"))
        for key in ("batch_size", "steps", "log_every", "keep_last", "max_nonfinite"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config key {key!r} must be an integer >= 1, got {v!r}")
        for key in ("image_every", "ckpt_every"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"config key {key!r} must be an integer >= 0 (0: off), got {v!r}")
        o = self.optim
        if not o.lr > 0 or o.end_lr < 0 or not 0 <= o.warmup_ratio < 1 or o.weight_decay < 0 or o.grad_clip < 0:
            raise ValueError(f"optim needs lr > 0, end_lr >= 0, 0 <= warmup_ratio < 1, weight_decay >= 0 and "
                             f"grad_clip >= 0 (got lr={o.lr}, end_lr={o.end_lr}, warmup_ratio={o.warmup_ratio}, "
                             f"weight_decay={o.weight_decay}, grad_clip={o.grad_clip})")
        if not all(0 <= b < 1 for b in o.betas) or not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.betas {list(o.betas)} and ema_decay {self.ema_decay} must lie in [0, 1)")
        if self.optim.warmup_steps is not None and self.task != "restok":
            raise ValueError(f"optim.warmup_steps is read by task 'restok' only (this is task {self.task!r}); "
                             "set optim.warmup_ratio instead")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {PRECISIONS} "
                             "(bf16: autocast; fp16 training is not supported)")


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """Tokenizer tasks (hieratok, restok): reconstruction losses, the GAN stage, latent alignment
    and held-out diagnostics."""

    loss: ReconLossConfig = field(default_factory=ReconLossConfig)
    gan: GANConfig = field(default_factory=lambda: GANConfig(weight=0.0))  # stage 2: gan.weight=0.6
    vf: VFConfig = field(default_factory=VFConfig)
    # per-scale PSNR and colour error of a fixed held-out batch (EMA weights if any, eval mode,
    # rank 0) every diag_every steps and at the end; 0 = off (see train/diagnostics.py)
    diag_every: int = 50
    diag_images: int = 8  # size of that batch
    diag_data: Optional[str] = None  # its images (folder / shards); None: the embedded held-out photos when
    # training on the embedded photos, else diag_images fixed (centre-cropped) training images

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.diag_every < 0 or self.diag_images < 1:
            raise ValueError(f"diag_every={self.diag_every} must be >= 0 (0: off) and "
                             f"diag_images={self.diag_images} >= 1")


@dataclass
class GeneratorTrainConfig(TrainConfig):
    """Generator tasks (dit, ar) on cached latents / codes: the objective and the sample grids."""

    objective: dict[str, Any] = field(default_factory=dict)  # GeneratorObjective fields (dit) / sampling (ar)
    tokenizer: Optional[str] = None  # decodes generated samples; default: the one recorded in the cache
    sample_cfg_scale: float = 4.0  # guidance of the periodic sample grids (appendix F visualises at 4.2)
    sample_count: int = 8


TASK_CONFIGS: dict[str, type] = {"hieratok": TokenizerTrainConfig, "restok": TokenizerTrainConfig,
                                 "dit": GeneratorTrainConfig, "ar": GeneratorTrainConfig}
TASK_ALIASES = {"tokenizer": "hieratok"}  # the name of task "hieratok" before 0.4; saved runs keep working


# Defaults per task, applied before a YAML file and overrides (appendix F for DiT; LlamaGen for AR).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "hieratok": {},
    # the release (configs/training/ResTok/restok_l_128.yaml): AdamW 1e-4, betas (0.9, 0.95), wd 1e-4, 5k
    # warm-up steps then cosine to 1e-5, grad norm clipped at 10, EMA 0.9999, LPIPS 1.0; its alignment term
    # (vf.weight=1 turns it on) uses a cosine margin of 0.25 and a constant weight
    "restok": {"preset": "restok-tiny", "out_dir": "runs/restok", "optim.lr": 1e-4, "optim.end_lr": 1e-5,
               "optim.betas": (0.9, 0.95), "optim.weight_decay": 1e-4, "optim.warmup_steps": 5000,
               "optim.grad_clip": 10.0, "ema_decay": 0.9999, "vf.margin_cos": 0.25, "vf.adaptive": False},
    "dit": {"preset": "dit-xl", "optim.lr": 1e-4, "optim.end_lr": 1e-4, "optim.warmup_ratio": 0.0,
            "optim.betas": (0.9, 0.999), "optim.weight_decay": 0.0, "optim.grad_clip": 0.0, "ema_decay": 0.9999,
            "batch_size": 256, "out_dir": "runs/dit", "image_every": 5000},
    "ar": {"preset": "gpt-l", "optim.lr": 1e-4, "optim.end_lr": 1e-5, "optim.warmup_ratio": 0.01,
           "optim.betas": (0.9, 0.95), "optim.weight_decay": 0.05, "optim.grad_clip": 1.0, "ema_decay": 0.9999,
           "batch_size": 256, "out_dir": "runs/har", "image_every": 5000,
           "sample_cfg_scale": 3.75},
}




def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with dotted keys replaced (``optim.lr``, ``model.scales`` ...)."""
    cfg = copy.copy(cfg)  # copies along each overridden path; checks run once all are applied
    for key, value in overrides.items():
        obj, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(obj, dict):
                if last:
                    obj[part] = value
                else:
                    obj = obj.setdefault(part, {})
                continue
            if not dataclasses.is_dataclass(obj):
                done = ".".join(parts[:i])
                raise ValueError(f"config key {key!r}: {done!r} is a value ({type(obj).__name__}), not a section")
            names = {f.name for f in dataclasses.fields(obj)}
            if part not in names:
                raise ValueError(f"unknown config key {key!r}: {type(obj).__name__} has no field {part!r} (fields: {sorted(names)})")
            if last:
                hints = get_type_hints(type(obj))
                setattr(obj, part, coerce_value(key, hints[part], value))
            else:
                child = getattr(obj, part)
                child = copy.copy(child)
                setattr(obj, part, child)
                obj = child
    return _revalidated(cfg)


def _revalidated(cfg: Any) -> Any:
    """``cfg`` rebuilt bottom-up, so that every nested config's ``__post_init__`` checks run on the
    overridden values."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    kids = {f.name: _revalidated(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    return dataclasses.replace(cfg, **kids)


def config_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-ready dict of a (nested) config."""
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return conv(dataclasses.asdict(cfg))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def task_name(task: str) -> str:
    """The task's current name (old names of saved runs map to it); unknown names are refused."""
    task = TASK_ALIASES.get(task, task)
    if task not in TASK_CONFIGS:
        raise ValueError(f"task {task!r} is not one of {sorted(TASK_CONFIGS)}")
    return task


def load_config(path: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None, base: Optional[TrainConfig] = None) -> TrainConfig:
    """Defaults (with the task's defaults), then a YAML file (same nesting as :class:`TrainConfig`),
    then dotted overrides."""
    overrides = dict(overrides or {})
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
    task = task_name(overrides.get("task", data.get("task", base.task if base else "hieratok")))
    overrides.pop("task", None)
    data.pop("task", None)
    if base is not None and task != base.task:
        raise ValueError(f"task {task!r} does not match the base config's task {base.task!r}")
    cfg = base or apply_overrides(TASK_CONFIGS[task](task=task), TASK_DEFAULTS[task])
    cfg = apply_overrides(cfg, _flatten(data))
    return apply_overrides(cfg, overrides)
