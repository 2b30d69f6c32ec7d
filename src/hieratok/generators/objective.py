"""One interface to train and sample a latent generator under either objective.

    training_loss(model, objective, latents, labels, generator)  -> {"loss": scalar, ...}
    sample_latents(model, objective, labels, cfg_scale, generator) -> latents (B, C, H, W)

Both take and return *tokenizer* latents: the model's :class:`LatentNormalizer` (its config's
``latent_mean`` / ``latent_std``) maps them to the normalised space the generator works in and back.
All randomness (timesteps, noise, label dropout, sampling noise) comes from the given
``torch.Generator``.

Legend: B batch, C latent channels, H/W latent side.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from .diffusion import GaussianDiffusion
from .flow import FLOW_SAMPLERS, T_SAMPLINGS, FlowMatching
from .latents import LatentNormalizer, randn

__all__ = [
    "GeneratorObjective", "OBJECTIVES", "LatentNormalizer", "build_process", "guided_model_fn", "sample_latents",
    "training_loss",
]

OBJECTIVES = ("diffusion", "flow")
DIFFUSION_SAMPLERS = ("ancestral", "ddim")
_DEFAULT_STEPS = {"diffusion": 250, "flow": 50}
_DEFAULT_SAMPLER = {"diffusion": "ancestral", "flow": "heun"}


@dataclass(frozen=True)
class GeneratorObjective:
    """What a generator is trained on and how it is sampled (plain data, JSON-serialisable).

    Attributes:
        kind: "diffusion" (DiT's DDPM, eps + learned variance; model needs ``learn_sigma=True`` or
            uses a fixed variance) or "flow" (linear flow matching, velocity; ``learn_sigma=False``).
        num_train_timesteps: diffusion steps T of the training process.
        beta_start: first beta of the linear schedule (for T = 1000).
        beta_end: last beta of the linear schedule (for T = 1000).
        sampling_steps: default number of sampling steps (None: 250 for diffusion, 50 for flow).
        sampler: default sampler (None: "ancestral" for diffusion, "heun" for flow); diffusion also
            has "ddim", flow "euler".
        ddim_eta: DDIM noise level (0 = deterministic).
        t_sampling: flow training-time distribution, "uniform" or "logit_normal".
        logit_mean: mean of the logit-normal t distribution.
        logit_std: std of the logit-normal t distribution.
        time_scale: flow models are conditioned on ``t * time_scale``.
    """

    kind: str = "diffusion"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampling_steps: Optional[int] = None
    sampler: Optional[str] = None
    ddim_eta: float = 0.0
    t_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective kind {self.kind!r} is not one of {OBJECTIVES}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.sampling_steps is not None and self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.sampling_steps}")
        if self.sampler is not None:
            _check_sampler(self.kind, self.sampler)
        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling {self.t_sampling!r} is not one of {T_SAMPLINGS}")
        if self.ddim_eta < 0:
            raise ValueError(f"ddim_eta must be >= 0, got {self.ddim_eta}")

    @property
    def default_steps(self) -> int:
        return self.sampling_steps or _DEFAULT_STEPS[self.kind]

    @property
    def default_sampler(self) -> str:
        return self.sampler or _DEFAULT_SAMPLER[self.kind]


def _check_sampler(kind: str, sampler: str) -> None:
    allowed = DIFFUSION_SAMPLERS if kind == "diffusion" else FLOW_SAMPLERS
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r} is not one of {allowed} for the {kind} objective")


Process = Union[GaussianDiffusion, FlowMatching]


@functools.lru_cache(maxsize=32)
def _build(objective: GeneratorObjective, learn_sigma: bool, respacing: Optional[str]) -> Process:
    if objective.kind == "flow":
        return FlowMatching(objective.t_sampling, objective.logit_mean, objective.logit_std, objective.time_scale)
    base = GaussianDiffusion.linear(objective.num_train_timesteps, objective.beta_start, objective.beta_end, learn_sigma)
    return base if respacing is None else base.respace(respacing)


def build_process(objective: GeneratorObjective, learn_sigma: bool = True, respacing: Optional[str] = None) -> Process:
    """The (cached) training process of ``objective``; for diffusion optionally respaced
    (e.g. ``"250"`` or ``"ddim50"``, see :func:`space_timesteps`)."""
    return _build(objective, learn_sigma, respacing)


def _check_model(model: nn.Module, objective: GeneratorObjective) -> None:
    learn_sigma = getattr(model.config, "learn_sigma", False)
    if objective.kind == "flow" and learn_sigma:
        raise ValueError("the flow objective predicts a velocity: build the DiT with learn_sigma=False")


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def training_loss(
    model: nn.Module,
    objective: GeneratorObjective,
    latents_BCHW: torch.Tensor,
    labels_B: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> dict[str, torch.Tensor]:
    """The training loss of a DiT on a batch of tokenizer latents (one call = one ``train_step``'s loss).

    Latents are normalised with ``model.normalizer``; timesteps, noise and (in training mode) the CFG
    label-dropout mask are drawn from ``generator``, in that order.

    Returns:
        ``{"loss": scalar}`` plus, for diffusion, the batch means ``mse`` and ``vb`` (the latter
        only with a learned variance); every value is a 0-dim tensor and ``loss`` carries the graph.
    """
    _check_model(model, objective)
    if labels_B.ndim != 1 or labels_B.shape[0] != latents_BCHW.shape[0]:
        raise ValueError(f"labels must have shape ({latents_BCHW.shape[0]},), got {tuple(labels_B.shape)}")
    x0 = model.normalizer.normalize(latents_BCHW)
    process = build_process(objective, getattr(model.config, "learn_sigma", False))

    def model_fn(x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        return model(x_t, t_model, labels_B, generator=generator)

    terms = process.training_losses(model_fn, x0, generator)
    return {k: v.mean() for k, v in terms.items() if k != "t"}


def guided_model_fn(model: nn.Module, labels_B: torch.Tensor, cfg_scale: float = 1.0
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x_t, t) -> prediction`` with the labels bound and classifier-free guidance at ``cfg_scale``;
    the model function both samplers call."""

    def fn(x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        return model.forward_with_cfg(x_t, t_model, labels_B, cfg_scale)

    return fn


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    objective: GeneratorObjective,
    labels_B: torch.Tensor,
    cfg_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    num_steps: Optional[int] = None,
    sampler: Optional[str] = None,
    noise_BCHW: Optional[torch.Tensor] = None,
    batch_size: Optional[int] = None,
    progress: bool = False,
    denormalize: bool = True,
) -> torch.Tensor:
    """Generate latents for ``labels`` (B,) with the objective's sampler.

    Args:
        model: a :class:`DiT` (any mode; labels are never dropped while sampling).
        objective: the objective the model was trained with.
        labels_B: integer class labels; ``model.null_class`` gives unconditional samples.
        cfg_scale: classifier-free guidance scale (1 = no guidance, one model pass per step).
        generator: source of the initial and per-step noise (same seed -> same latents).
        num_steps: sampling steps (default ``objective.default_steps``: 250 respaced diffusion steps
            or 50 ODE steps); at least 2 for diffusion, 1 for flow.
        sampler: "ancestral" / "ddim" (diffusion) or "euler" / "heun" (flow); default from objective.
        noise_BCHW: start from this noise (normalised space) instead of drawing it.
        batch_size: split the labels into chunks of at most this size (noise drawn chunk by chunk).
        progress: show a tqdm bar over the steps.
        denormalize: return tokenizer latents (True) or the model's normalised latents.

    Returns:
        Latents (B, C, H, W), float32, on the model's device.
    """
    _check_model(model, objective)
    cfg = model.config
    if labels_B.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor (B,), got shape {tuple(labels_B.shape)}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    steps = objective.default_steps if num_steps is None else num_steps
    min_steps = 2 if objective.kind == "diffusion" else 1  # 1 respaced diffusion step is t=0 alone
    if steps < min_steps:
        raise ValueError(f"num_steps must be >= {min_steps} for {objective.kind}, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None for the whole batch), got {batch_size}")
    method = sampler or objective.default_sampler
    _check_sampler(objective.kind, method)
    device = _device(model)
    labels_B = labels_B.to(device)
    B = labels_B.shape[0]
    shape = (B, cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise_BCHW is not None and tuple(noise_BCHW.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise_BCHW.shape)}")
    chunk = max(B, 1) if batch_size is None else batch_size
    if objective.kind == "diffusion":
        T = objective.num_train_timesteps
        if steps > T:
            raise ValueError(f"num_steps {steps} exceeds the {T} training timesteps")
        respacing = f"ddim{steps}" if method == "ddim" and T % steps == 0 else str(steps)
        process = build_process(objective, cfg.learn_sigma, respacing)
    else:
        process = build_process(objective)
    outs = []
    for s in range(0, B, chunk):
        y = labels_B[s:s + chunk]
        if noise_BCHW is not None:
            z = noise_BCHW[s:s + chunk].to(device=device, dtype=torch.float32)
        else:
            z = randn((y.shape[0],) + shape[1:], generator, device)
        fn = guided_model_fn(model, y, cfg_scale)
        if objective.kind == "diffusion":
            x = process.sample_loop(fn, z, generator, method, objective.ddim_eta, progress=progress)
        else:
            x = process.sample(fn, z, steps, method, progress=progress)
        outs.append(x)
    x = torch.cat(outs) if outs else torch.empty(shape, device=device)
    return model.normalizer.denormalize(x) if denormalize else x

