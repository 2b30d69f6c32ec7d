"""Gaussian diffusion as trained by DiT: DDPM forward process with a linear beta schedule, epsilon
prediction with a learned (range-interpolated) variance, the "hybrid" loss of improved DDPM
(Nichol & Dhariwal, 2021), timestep respacing and ancestral / DDIM sampling.

    q(x_t | x_0)       = N(sqrt(abar_t) x_0, (1 - abar_t) I)                      abar_t = prod_{s<=t} (1 - beta_s)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I)                     beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    p(x_{t-1} | x_t)   = N(mu(x_t, eps_theta), exp(v log beta_t + (1 - v) log beta~_t))   v = (out + 1) / 2
    loss               = ||eps - eps_theta||^2 (per-element mean) + L_vlb(t) with the mean stopped

Timesteps are integer indices 0..T-1 (0 = least noise). All schedule arithmetic is float64; values
are cast to float32 when they meet the latents, as in the reference implementation. A model
function is called as ``model_fn(x_t, t_model)`` where ``t_model`` (B,) are the *original*
timestep indices (as floats), also for a respaced process.

Legend: B batch, C latent channels, H/W latent side, T number of timesteps.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .latents import randn

__all__ = [
    "GaussianDiffusion", "linear_beta_schedule", "space_timesteps", "normal_kl", "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood", "ModelFn",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_beta_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear betas, stretched so any T gives the same process as T = 1000 (float64, (T,))."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> list[int]:
    """Timesteps of the original process kept by a respaced one (sorted).

    ``section_counts`` is e.g. ``"250"`` (250 roughly evenly spaced steps including 0 and T-1),
    ``"10,15,20"`` (the process cut into equal thirds, strided to 10, 15 and 20 steps) or
    ``"ddim50"`` (the DDIM paper's fixed integer stride below T, which must give exactly 50 steps).
    The same steps as OpenAI's ``respace.space_timesteps`` (improved-diffusion, used by DiT),
    including its rounding of an accumulated fractional stride; a section of count 1 keeps only
    its first timestep (so ``"1"`` keeps t = 0 alone).
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        s = section_counts.strip()
        if s.startswith("ddim"):
            want = int(s[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride gives exactly {want} of {num_timesteps} steps; use plain '{want}'")
        section_counts = [int(x) for x in s.split(",")]
    counts = list(section_counts)
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be positive, got {counts}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        idx = 0.0
        for _ in range(count):  # the reference accumulates the stride (differs from round(k * stride))
            steps.append(start + round(idx))
            idx += stride
        start += size
    return sorted(set(steps))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF (used by DDPM's decoder likelihood)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        bin_width: float = 2.0 / 255) -> torch.Tensor:
    """Log-probability (nats, elementwise) of ``x`` under N(means, e^{2 log_scales}) integrated over
    the bin [x - w/2, x + w/2] (DDPM's L_0 for data in [-1, 1] on 256 levels; the edge bins extend
    to +-infinity below -0.999 and above 0.999)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + bin_width / 2))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """A DDPM process given by its betas, possibly respaced (a subset of an original process).

    Args:
        betas: (T,) float64 noise schedule.
        learn_sigma: the model outputs 2C channels, the last C interpolating the log-variance between
            beta~_t (out = -1) and beta_t (out = +1) ("learned range"); otherwise the variance is fixed
            to beta_t (with beta~_1 at t = 0, DDPM's "fixed large").
        timestep_map: the original timestep index of each of the T steps (identity by default); the
            model always sees original indices.
    """

    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True, timestep_map: Optional[Sequence[int]] = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or bool((betas <= 0).any()) or bool((betas > 1).any()):
            raise ValueError("betas must be a non-empty sequence of values in (0, 1]")
        T = betas.numel()
        self.learn_sigma = learn_sigma
        self.betas = betas
        tmap = range(T) if timestep_map is None else timestep_map
        self.timestep_map = torch.as_tensor(list(tmap), dtype=torch.int64)
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have {T} entries, got {tuple(self.timestep_map.shape)}")
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta~_0 = 0: clip the log at t = 0 to beta~_1 (only used as the lower end of the learned range).
        pv1 = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv1, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)
        self.log_betas = torch.log(betas)
        self.fixed_large_log_variance = torch.log(torch.cat([pv1, betas[1:]]))
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               learn_sigma: bool = True) -> "GaussianDiffusion":
        """DiT's process: linear betas over ``num_timesteps`` steps."""
        return cls(linear_beta_schedule(num_timesteps, beta_start, beta_end), learn_sigma)

    def respace(self, section_counts: Union[str, int, Sequence[int]]) -> "GaussianDiffusion":
        """The process restricted to the kept steps of :func:`space_timesteps`; its betas are chosen
        so that ``alphas_cumprod`` at the kept steps equals the original (improved DDPM, sec. 4)."""
        keep = space_timesteps(self.num_timesteps, section_counts)
        if keep == [0] and self.num_timesteps > 1:
            raise ValueError(f"respacing {section_counts!r} keeps only t=0, so sampling would return the noise; "
                             "keep at least 2 steps")
        abar = self.alphas_cumprod[keep]
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return GaussianDiffusion(1.0 - abar / prev, self.learn_sigma, self.timestep_map[keep].tolist())

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    # ---- helpers --------------------------------------------------------------------------------
    def _extract(self, name: str, t_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Schedule value ``name`` at timesteps t, as float32 on x's device, shaped (B, 1, 1, ...)."""
        key = (name, str(x.device))
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(torch.float32).to(x.device)
        v = self._cache[key].index_select(0, t_B.to(x.device).long())  # (much faster than a[t] on CPU)
        return v.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    def model_timesteps(self, t_B: torch.Tensor) -> torch.Tensor:
        """Original timestep indices (float, (B,)) the model is conditioned on."""
        return self.timestep_map.to(t_B.device).index_select(0, t_B.long()).float()

    def sample_timesteps(self, batch: int, generator: Optional[torch.Generator] = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform integer timesteps (B,) from ``generator`` (drawn on its device)."""
        src = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=src).to(device)

    def _split(self, model_output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        C = x_t.shape[1]
        want = 2 * C if self.learn_sigma else C
        if model_output.shape[1] != want or model_output.shape[0] != x_t.shape[0] or model_output.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"model output {tuple(model_output.shape)} does not fit latents {tuple(x_t.shape)} "
                             f"(expected {want} channels with learn_sigma={self.learn_sigma})")
        if self.learn_sigma:
            eps, v = model_output.split(C, dim=1)
            return eps, v
        return model_output, None

    # ---- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t_B: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        e = self._extract
        return e("sqrt_alphas_cumprod", t_B, x0) * x0 + e("sqrt_one_minus_alphas_cumprod", t_B, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t_B: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t_B, x_t) * x0 + self._extract("posterior_mean_coef2", t_B, x_t) * x_t
        return (mean, self._extract("posterior_variance", t_B, x_t).expand_as(x_t),
                self._extract("posterior_log_variance_clipped", t_B, x_t).expand_as(x_t))

    def predict_x0_from_eps(self, x_t: torch.Tensor, t_B: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        e = self._extract
        return e("sqrt_recip_alphas_cumprod", t_B, x_t) * x_t - e("sqrt_recipm1_alphas_cumprod", t_B, x_t) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t_B: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        e = self._extract
        return (e("sqrt_recip_alphas_cumprod", t_B, x_t) * x_t - x0) / e("sqrt_recipm1_alphas_cumprod", t_B, x_t)

    # ---- reverse process ------------------------------------------------------------------------
    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t_B: torch.Tensor,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """Parameters of p(x_{t-1} | x_t) from a model output (eps [, variance values]).

        Returns dict with ``mean``, ``variance``, ``log_variance``, ``pred_x0``, ``eps``.
        """
        eps, v = self._split(model_output, x_t)
        if v is not None:
            min_log = self._extract("posterior_log_variance_clipped", t_B, x_t)
            max_log = self._extract("log_betas", t_B, x_t)
            frac = (v + 1) / 2  # the model's [-1, 1] output -> interpolation weight
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            log_var = self._extract("fixed_large_log_variance", t_B, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t_B, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t_B)
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """The variational-bound term L_t in bits per dimension, (B,): KL(q(x_{t-1}|x_t,x_0) || p) for
        t > 0 and the discretised Gaussian decoder NLL -log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t_B)
        out = self.p_mean_variance(model_output, x_t, t_B)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t_B.to(x0.device) == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                        t_B: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Per-sample hybrid loss (B,): ``mse`` on eps plus, with a learned variance, ``vb`` computed
        with the eps prediction detached (the VLB trains only the variance; improved DDPM sec. 3.1).

        Timesteps and noise are drawn from ``generator`` (in that order) unless given.
        """
        B = x0.shape[0]
        if t_B is None:
            t_B = self.sample_timesteps(B, generator, x0.device)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, t_B, noise)
        out = model_fn(x_t, self.model_timesteps(t_B))
        eps, v = self._split(out, x_t)
        terms = {"mse": _mean_flat((noise - eps).float() ** 2)}
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen.float(), x0.float(), x_t.float(), t_B)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        terms["t"] = t_B
        return terms

    def p_sample(self, model_fn: ModelFn, x_t: torch.Tensor, t_B: torch.Tensor, generator: Optional[torch.Generator] = None,
                 clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} (no noise is added at t = 0)."""
        out = self.p_mean_variance(model_fn(x_t, self.model_timesteps(t_B)), x_t, t_B, clip_denoised)
        noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        nonzero = (t_B != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise, "pred_x0": out["pred_x0"]}

    def ddim_sample(self, model_fn: ModelFn, x_t: torch.Tensor, t_B: torch.Tensor, generator: Optional[torch.Generator] = None,
                    eta: float = 0.0, clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al., eq. 12); ``eta = 0`` is deterministic. Learned variances are ignored."""
        out = self.p_mean_variance(model_fn(x_t, self.model_timesteps(t_B)), x_t, t_B, clip_denoised)
        eps = self.predict_eps_from_x0(x_t, t_B, out["pred_x0"])
        abar = self._extract("alphas_cumprod", t_B, x_t)
        abar_prev = self._extract("alphas_cumprod_prev", t_B, x_t)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_x0"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        sample = mean
        if eta > 0:
            noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
            nonzero = (t_B != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
            sample = mean + nonzero * sigma * noise
        return {"sample": sample, "pred_x0": out["pred_x0"]}

    def sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, generator: Optional[torch.Generator] = None,
                    method: str = "ancestral", eta: float = 0.0, clip_denoised: bool = False,
                    progress: bool = False) -> torch.Tensor:
        """Run the reverse process from ``noise`` (x_{T-1}) to x_0 with "ancestral" or "ddim" steps.

        Per-step noise is drawn from ``generator``.
        """
        if method not in ("ancestral", "ddim"):
            raise ValueError(f"diffusion sampler {method!r} is not one of ('ancestral', 'ddim')")
        x = noise
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(steps, desc=f"diffusion ({method})", disable=not progress, leave=False):
            t_B = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
            if method == "ancestral":
                x = self.p_sample(model_fn, x, t_B, generator, clip_denoised)["sample"]
            else:
                x = self.ddim_sample(model_fn, x, t_B, generator, eta, clip_denoised)["sample"]
        return x
