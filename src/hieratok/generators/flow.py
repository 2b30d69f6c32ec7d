"""Flow matching with the linear (rectified-flow) interpolant and velocity prediction.

Direction convention (the rectified-flow one; SiT uses the mirror image t -> 1 - t):

    x_t = (1 - t) x_0 + t eps,   t in [0, 1],   t = 0 data, t = 1 pure noise
    target velocity  v = dx_t/dt = eps - x_0
    loss             = ||v_theta(x_t, t) - (eps - x_0)||^2  (per-element mean)

Sampling integrates dx/dt = v_theta(x, t) from t = 1 (x = noise) down to t = 0 on a uniform grid
with Euler or Heun steps. The model is conditioned on ``t * time_scale`` (default 1000, so a DiT
timestep embedder sees the same range as under the diffusion objective).

Legend: B batch, C latent channels, H/W latent side.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .latents import rand, randn

__all__ = ["FlowMatching", "FLOW_SAMPLERS", "T_SAMPLINGS"]

FLOW_SAMPLERS = ("euler", "heun")
T_SAMPLINGS = ("uniform", "logit_normal")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FlowMatching:
    """Linear-interpolant flow matching (velocity target) with an Euler / Heun ODE sampler.

    Args:
        t_sampling: training-time distribution of t: "uniform" on [0, 1] or "logit_normal"
            (t = sigmoid(m + s n), n ~ N(0, 1); SD3 / Esser et al. 2024).
        logit_mean: m of the logit-normal.
        logit_std: s of the logit-normal.
        time_scale: the model is conditioned on ``t * time_scale``.
    """

    def __init__(self, t_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 time_scale: float = 1000.0) -> None:
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling {t_sampling!r} is not one of {T_SAMPLINGS}")
        if logit_std <= 0 or time_scale <= 0:
            raise ValueError(f"logit_std and time_scale must be > 0, got {logit_std} and {time_scale}")
        self.t_sampling, self.logit_mean, self.logit_std, self.time_scale = t_sampling, logit_mean, logit_std, time_scale

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t noise."""
        t = t_B.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - t) * x0 + t * noise

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """d x_t / dt = noise - x_0."""
        return noise - x0

    def sample_t(self, batch: int, generator: Optional[torch.Generator] = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Training times t (B,) in [0, 1] from ``generator``."""
        if self.t_sampling == "uniform":
            return rand((batch,), generator, device)
        return torch.sigmoid(self.logit_mean + self.logit_std * randn((batch,), generator, device))

    def model_time(self, t_B: torch.Tensor) -> torch.Tensor:
        return t_B.float() * self.time_scale

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                        t_B: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Per-sample velocity MSE (B,) as ``loss`` (and ``t``). t and noise are drawn from
        ``generator`` (in that order) unless given."""
        B = x0.shape[0]
        if t_B is None:
            t_B = self.sample_t(B, generator, x0.device)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        out = model_fn(self.interpolate(x0, noise, t_B), self.model_time(t_B))
        if out.shape != x0.shape:
            raise ValueError(f"flow matching needs a model output shaped like the latents {tuple(x0.shape)}, got "
                             f"{tuple(out.shape)} (build the DiT with learn_sigma=False)")
        loss = (out.float() - self.velocity_target(x0, noise).float()).pow(2).flatten(1).mean(dim=1)
        return {"loss": loss, "t": t_B}

    def sample(self, model_fn: ModelFn, noise: torch.Tensor, num_steps: int = 50, method: str = "heun",
               progress: bool = False) -> torch.Tensor:
        """Integrate from t = 1 (``noise``) to t = 0 on ``num_steps`` uniform steps.

        Heun (2nd order) corrects every step except the last one into t = 0, which is an Euler step
        (as in EDM, Karras et al. 2022), so it costs 2 * num_steps - 1 model calls; Euler costs
        num_steps.
        """
        if method not in FLOW_SAMPLERS:
            raise ValueError(f"flow sampler {method!r} is not one of {FLOW_SAMPLERS}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
        x = noise
        B = x.shape[0]

        def v(x_: torch.Tensor, t: float) -> torch.Tensor:
            return model_fn(x_, self.model_time(torch.full((B,), t, device=x_.device))).to(x_.dtype)

        for i in tqdm(range(num_steps), desc=f"flow ({method})", disable=not progress, leave=False):
            t, t_next = ts[i], ts[i + 1]
            dt = t_next - t  # negative: integrating towards the data
            d = v(x, t)
            x_euler = x + dt * d
            if method == "heun" and t_next > 0:
                x = x + dt * 0.5 * (d + v(x_euler, t_next))
            else:
                x = x_euler
        return x
