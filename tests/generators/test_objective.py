import numpy as np
import pytest
import torch
from torch import nn

from hieratok.generators import (
    DiT,
    DiTConfig,
    GeneratorObjective,
    LatentNormalizer,
    build_process,
    sample_latents,
    training_loss,
)

TOY = dict(input_size=4, in_channels=4, depth=2, width=64, num_heads=4, num_classes=2)
DIFF = GeneratorObjective(kind="diffusion")
FLOW = GeneratorObjective(kind="flow")


def make(objective: GeneratorObjective, seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    m = DiT(DiTConfig(**{**TOY, "learn_sigma": objective.kind == "diffusion", **kw}))
    with torch.no_grad():  # perturb every parameter: the zero-initialised adaLN / output layers would give constant outputs
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_latent_normalizer(gen):
    scale, shift = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1), torch.tensor([0.0, 3.0, -1.0]).view(1, 3, 1, 1)
    z = torch.randn(50, 3, 4, 4, generator=gen) * scale + shift
    norm = LatentNormalizer.from_latents(z)
    arr = z.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(norm.mean.numpy(), arr.mean(1), rtol=1e-10)
    np.testing.assert_allclose(norm.std.numpy(), arr.std(1), rtol=1e-10)
    n = norm.normalize(z)
    torch.testing.assert_close(n.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalize(n), z, atol=1e-5, rtol=1e-5)
    ident = LatentNormalizer()
    assert ident.is_identity and ident.normalize(z) is z
    with pytest.raises(ValueError):
        LatentNormalizer([0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        LatentNormalizer([0.0], None)


@pytest.mark.parametrize("objective,steps,cfg", [(DIFF, 8, 1.0), (DIFF, 8, 3.0), (FLOW, 4, 1.0), (FLOW, 4, 2.5)])
def test_sampling_deterministic_under_seed(objective, steps, cfg):
    m = make(objective)
    y = torch.tensor([0, 1, 1])

    def run(seed):
        return sample_latents(m, objective, y, cfg, torch.Generator().manual_seed(seed), num_steps=steps)

    a = run(0)
    assert a.shape == (3, 4, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, run(0))
    assert not torch.allclose(a, run(1))


@pytest.mark.parametrize("objective,sampler", [(DIFF, "ddim"), (FLOW, "euler"), (FLOW, "heun")])
def test_chunking_and_normalisation(objective, sampler, gen):
    norm = LatentNormalizer([0.5, -1.0, 0.0, 2.0], [2.0, 0.5, 1.0, 3.0])
    m = make(objective, **norm.config_fields())
    y = torch.tensor([0, 1, 0, 1, 1])
    noise = torch.randn(5, 4, 4, 4, generator=gen)
    kw = dict(num_steps=5, sampler=sampler, noise_BCHW=noise)
    full = sample_latents(m, objective, y, 2.0, **kw)
    chunked = sample_latents(m, objective, y, 2.0, batch_size=2, **kw)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    raw = sample_latents(m, objective, y, 2.0, denormalize=False, **kw)
    torch.testing.assert_close(full, norm.denormalize(raw))


class _PointOracle(nn.Module):
    """Knows the (normalised) data is one point a; predicts the exact eps (diffusion) or velocity (flow)."""

    def __init__(self, a_raw: torch.Tensor, norm: LatentNormalizer, objective: GeneratorObjective) -> None:
        super().__init__()
        C, S = a_raw.shape[1], a_raw.shape[-1]
        self.config = DiTConfig(input_size=S, in_channels=C, depth=1, width=8, num_heads=1,
                                learn_sigma=objective.kind == "diffusion", **norm.config_fields())
        self.normalizer = norm
        self.a = norm.normalize(a_raw)
        self.objective = objective
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        if self.objective.kind == "flow":
            return (x - self.a) / (t / self.objective.time_scale).view(-1, 1, 1, 1)
        abar = build_process(self.objective).alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.a) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


@pytest.mark.parametrize("objective,steps", [(DIFF, 250), (DIFF, 20), (FLOW, 10)])
def test_pipeline_with_oracle_lands_on_raw_data_point(objective, steps, gen):
    a_raw = torch.randn(1, 3, 2, 2, generator=gen) * 4 + 2
    norm = LatentNormalizer([1.0, 2.0, 3.0], [4.0, 3.0, 2.0])
    z = sample_latents(_PointOracle(a_raw, norm, objective), objective, torch.zeros(3, dtype=torch.long),
                       generator=gen, num_steps=steps)
    torch.testing.assert_close(z, a_raw.expand(3, -1, -1, -1), atol=1e-3, rtol=0)


def _toy_data(n_per_class: int = 16):
    g = torch.Generator().manual_seed(123)
    protos = torch.randn(2, 4, 4, 4, generator=g) * 2 + 1  # two fixed "class latents"
    z = protos.repeat_interleave(n_per_class, 0) + 0.05 * torch.randn(2 * n_per_class, 4, 4, 4, generator=g)
    y = torch.arange(2).repeat_interleave(n_per_class)
    return z, y


@pytest.mark.parametrize("objective", [DIFF, FLOW], ids=["diffusion", "flow"])
def test_tiny_dit_learns_toy_latents(objective):
    z, y = _toy_data()
    norm = LatentNormalizer.from_latents(z)
    torch.manual_seed(0)
    m = DiT(DiTConfig(**TOY, learn_sigma=objective.kind == "diffusion", **norm.config_fields()))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)

    def eval_loss() -> float:
        m.eval()
        with torch.no_grad():
            vals = [training_loss(m, objective, z, y, torch.Generator().manual_seed(100 + k))["loss"] for k in range(4)]
        m.train()
        return torch.stack(vals).mean().item()

    before = eval_loss()
    gen = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(80):
        out = training_loss(m, objective, z, y, gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)


def test_training_loss_contract(gen):
    z, y = _toy_data(2)
    m = make(DIFF).train()
    out = training_loss(m, DIFF, z, y, torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "mse", "vb"} and out["loss"].ndim == 0 and out["loss"].requires_grad
    assert torch.equal(out["loss"], training_loss(m, DIFF, z, y, torch.Generator().manual_seed(0))["loss"])
    assert set(training_loss(make(FLOW), FLOW, z, y, gen)) == {"loss"}
    with pytest.raises(ValueError, match="learn_sigma"):
        training_loss(m, FLOW, z, y, gen)
    with pytest.raises(ValueError, match="labels"):
        training_loss(m, DIFF, z, y[:1], gen)


def test_objective_validation():
    assert DIFF.default_steps == 250 and DIFF.default_sampler == "ancestral"
    assert FLOW.default_steps == 50 and FLOW.default_sampler == "heun"
    with pytest.raises(ValueError, match="kind"):
        GeneratorObjective(kind="gan")
    with pytest.raises(ValueError, match="sampler"):
        GeneratorObjective(kind="flow", sampler="ddim")
    m = make(DIFF)
    with pytest.raises(ValueError, match="sampler"):
        sample_latents(m, DIFF, torch.tensor([0]), sampler="euler", num_steps=2)
    with pytest.raises(ValueError, match="exceeds"):
        sample_latents(m, DIFF, torch.tensor([0]), num_steps=2000)


def test_step_and_batch_counts_are_checked():
    """No silent defaults: 0 steps or batch 0 is an error; 1 diffusion step (t = 0 on pure noise) too."""
    m = make(DIFF)
    y = torch.tensor([0])
    for steps in (0, 1, -3):
        with pytest.raises(ValueError, match="num_steps"):
            sample_latents(m, DIFF, y, num_steps=steps)
    with pytest.raises(ValueError, match="num_steps"):
        sample_latents(make(FLOW), FLOW, y, num_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        sample_latents(m, DIFF, y, num_steps=2, batch_size=0)
    # one flow step is one Euler step from t = 1 to t = 0: x0 = noise - v(noise, 1)
    f = make(FLOW)
    noise = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        v = f(noise, build_process(FLOW).model_time(torch.ones(1)), y)
    got = sample_latents(f, FLOW, y, num_steps=1, sampler="euler", noise_BCHW=noise, denormalize=False)
    torch.testing.assert_close(got, noise - v)
