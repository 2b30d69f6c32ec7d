import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from hieratok.generators import GaussianDiffusion, linear_beta_schedule, space_timesteps
from hieratok.generators.diffusion import discretized_gaussian_log_likelihood, normal_kl


def np_schedule(T=1000):
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


def test_linear_schedule_and_q_sample(gen):
    d = GaussianDiffusion.linear(1000)
    betas, abar = np_schedule()
    np.testing.assert_allclose(d.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-10)
    x0 = torch.randn(4, 2, 3, 3, generator=gen)
    noise = torch.randn(4, 2, 3, 3, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    ref = (np.sqrt(abar[t.numpy()])[:, None, None, None] * x0.double().numpy()
           + np.sqrt(1 - abar[t.numpy()])[:, None, None, None] * noise.double().numpy())
    np.testing.assert_allclose(d.q_sample(x0, t, noise).numpy(), ref, atol=1e-6)
    # T = 500 is the same process stretched: betas doubled.
    np.testing.assert_allclose(linear_beta_schedule(500).numpy(), np_schedule(500)[0])


def test_posterior_matches_bayes_rule(gen):
    """q(x_{t-1} | x_t, x_0) from the Gaussian product of N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and
    N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
    d = GaussianDiffusion.linear(1000)
    betas, abar = np_schedule()
    x0 = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    xt = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 300, 999])
    mean, var, logvar = d.q_posterior_mean_variance(x0.float(), xt.float(), t)
    for i, ti in enumerate(t.tolist()):
        prior_var, a = 1 - abar[ti - 1], 1 - betas[ti]
        post_var = 1.0 / (1.0 / prior_var + a / betas[ti])
        post_mean = post_var * (np.sqrt(abar[ti - 1]) * x0[i].numpy() / prior_var + np.sqrt(a) * xt[i].numpy() / betas[ti])
        np.testing.assert_allclose(mean[i].numpy(), post_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[i].numpy(), post_var, rtol=1e-5)
        np.testing.assert_allclose(logvar[i].numpy(), np.log(post_var), rtol=1e-5)
    # t = 0: the posterior collapses onto x_0 (its log-variance is clipped to beta~_1).
    m0, v0, lv0 = d.q_posterior_mean_variance(x0.float(), xt.float(), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(m0, x0.float())
    assert torch.all(v0 == 0)
    np.testing.assert_allclose(lv0.numpy(), np.log(betas[1] * (1 - abar[0]) / (1 - abar[1])), rtol=1e-5)


def test_learned_range_variance_interpolates(gen):
    d = GaussianDiffusion.linear(1000)
    x = torch.randn(2, 1, 2, 2, generator=gen)
    t = torch.tensor([5, 700])
    for v, want in ((-1.0, d.posterior_log_variance_clipped), (1.0, d.log_betas)):
        out = d.p_mean_variance(torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1), x, t)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(), want[t].numpy(), rtol=1e-6)
    mid = d.p_mean_variance(torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1), x, t)["log_variance"]
    np.testing.assert_allclose(mid[:, 0, 0, 0].numpy(), (0.5 * (d.posterior_log_variance_clipped + d.log_betas))[t].numpy(), rtol=1e-6)


def test_normal_kl_against_torch_distributions(gen):
    m1, m2 = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    l1, l2 = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), ref)


def test_vlb_t0_is_discretized_gaussian_nll_and_t_pos_is_kl(gen):
    d = GaussianDiffusion.linear(1000)
    x0 = torch.rand(2, 1, 4, 4, generator=gen) * 1.6 - 0.8
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # edge bins
    noise = torch.randn(x0.shape, generator=gen)
    v = torch.rand(x0.shape, generator=gen) * 2 - 1
    eps_hat = noise + 0.3 * torch.randn(x0.shape, generator=gen)
    out = torch.cat([eps_hat, v], 1)
    t0 = torch.zeros(2, dtype=torch.long)
    xt = d.q_sample(x0, t0, noise)
    got = d.vb_terms_bpd(out, x0, xt, t0)
    # Independent reference with the exact normal CDF (scipy).
    b0, pv1 = d.betas[0].item(), d.posterior_variance[1].item()
    mu = ((xt - math.sqrt(b0) * eps_hat) / math.sqrt(1 - b0)).double().numpy()  # at t = 0 the mean is pred_x0
    logvar = ((v.double() + 1) / 2 * math.log(b0) + (1 - (v.double() + 1) / 2) * math.log(pv1)).numpy()
    s, x = np.exp(0.5 * logvar), x0.double().numpy()
    hi, lo = norm.cdf((x + 1 / 255 - mu) / s), norm.cdf((x - 1 / 255 - mu) / s)
    p = np.where(x < -0.999, hi, np.where(x > 0.999, 1 - lo, hi - lo))
    ref = -np.log(np.maximum(p, 1e-12)).reshape(2, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(got.numpy(), ref, rtol=2e-2)
    # t > 0: KL between the true posterior and the model's Gaussian, in bits.
    t = torch.tensor([3, 600])
    xt = d.q_sample(x0, t, noise)
    pm, _, plv = d.q_posterior_mean_variance(x0, xt, t)
    mv = d.p_mean_variance(out, xt, t)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(pm, (0.5 * plv).exp()),
                                            torch.distributions.Normal(mv["mean"], (0.5 * mv["log_variance"]).exp()))
    torch.testing.assert_close(d.vb_terms_bpd(out, x0, xt, t), ref.flatten(1).mean(1) / math.log(2), atol=1e-5, rtol=1e-4)


def test_discretized_likelihood_sums_to_one():
    """Over the 256 bins of [-1, 1] the probabilities of any Gaussian sum to ~1 (edge bins open)."""
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mu, ls in ((0.1, -2.0), (-0.7, -4.0)):
        lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mu), torch.full_like(x, ls))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def test_hybrid_loss_terms_and_stop_gradient(gen):
    d = GaussianDiffusion.linear(1000)
    x0 = torch.randn(4, 2, 3, 3, generator=gen)
    out = torch.randn(4, 4, 3, 3, generator=gen).requires_grad_(True)
    g1 = torch.Generator().manual_seed(3)
    terms = d.training_losses(lambda x, t: out, x0, g1)
    # Same draws as the loss: t first, then noise.
    g2 = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=g2)
    noise = torch.randn(x0.shape, generator=g2)
    assert torch.equal(terms["t"], t)
    torch.testing.assert_close(terms["mse"], ((noise - out[:, :2]) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert torch.count_nonzero(out.grad[:, :2]) == 0 and torch.count_nonzero(out.grad[:, 2:]) > 0


def test_space_timesteps():
    s = space_timesteps(1000, "250")
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    s = space_timesteps(300, "10,15,20")
    assert len(s) == 45 and sum(x < 100 for x in s) == 10 and sum(200 <= x for x in s) == 20
    assert space_timesteps(10, 10) == list(range(10))
    with pytest.raises(ValueError):
        space_timesteps(100, "ddim33")
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def openai_space_timesteps(num_timesteps, section_counts):
    """improved-diffusion's respace.space_timesteps (OpenAI, used by DiT), transcribed as written."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def test_space_timesteps_matches_openai_for_every_count():
    for n in range(1, 1001):
        assert space_timesteps(1000, str(n)) == sorted(openai_space_timesteps(1000, str(n))), n
    assert space_timesteps(1000, "21") != sorted({round(k * 999 / 20) for k in range(21)})  # accumulation matters
    for spec in ("10,15,20", "1,1,1", "7,3", "100,5", "ddim1000", "ddim50", "ddim2"):
        assert space_timesteps(1000, spec) == sorted(openai_space_timesteps(1000, spec)), spec
    for spec in ("ddim1", "ddim999"):
        with pytest.raises(ValueError):
            openai_space_timesteps(1000, spec)
        with pytest.raises(ValueError):
            space_timesteps(1000, spec)


def test_respacing_to_t0_alone_is_refused():
    """One respaced step keeps only t = 0 (OpenAI's spacing): sampling it would return the noise."""
    with pytest.raises(ValueError, match="only t=0"):
        GaussianDiffusion.linear(1000).respace("1")
    assert GaussianDiffusion.linear(1000).respace("2").timestep_map.tolist() == [0, 999]


@pytest.mark.parametrize("spacing", ["250", "ddim50", "7,3"])
def test_respacing_keeps_alphas_cumprod(spacing):
    base = GaussianDiffusion.linear(1000)
    r = base.respace(spacing)
    keep = space_timesteps(1000, spacing)
    assert r.timestep_map.tolist() == keep
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), base.alphas_cumprod[keep].numpy(), rtol=1e-12)
    # Respacing a respaced process composes the maps.
    rr = r.respace("10")
    assert rr.timestep_map.tolist() == [keep[i] for i in space_timesteps(r.num_timesteps, "10")]


@pytest.mark.parametrize("spacing,method,learn_sigma", [
    (None, "ancestral", True), ("250", "ancestral", False), ("ddim25", "ddim", True), ("13", "ancestral", True),
])
def test_oracle_denoiser_lands_on_the_data_point(spacing, method, learn_sigma, gen):
    """Single-point data a: the exact eps is (x_t - sqrt(abar_t) a) / sqrt(1 - abar_t), with abar of
    the *original* timestep the model is told (this also checks the respaced timestep map)."""
    base = GaussianDiffusion.linear(1000, learn_sigma=learn_sigma)
    d = base if spacing is None else base.respace(spacing)
    a = torch.randn(1, 3, 2, 2, generator=gen).expand(5, -1, -1, -1)
    abar = base.alphas_cumprod

    def oracle(x, t_model):
        ab = abar[t_model.long()].float().view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * a) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    x = d.sample_loop(oracle, torch.randn(a.shape, generator=gen), gen, method)
    torch.testing.assert_close(x, a.contiguous(), atol=1e-4, rtol=0)


def test_ancestral_sampler_recovers_a_gaussian(gen):
    """Data N(m, s^2): with the exact E[eps | x_t] and the posterior variance (v = -1) the
    1000-step ancestral sampler draws from the data distribution."""
    d = GaussianDiffusion.linear(1000)
    m, s = 0.5, 0.3
    abar = d.alphas_cumprod

    def oracle(x, t_model):
        ab = abar[t_model.long()].float().view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() / (ab * s * s + 1 - ab) * (x - ab.sqrt() * m)
        return torch.cat([eps, -torch.ones_like(eps)], 1)

    # 4000 independent scalars as one (1, 1, 40, 100) latent: the process is elementwise.
    x = d.sample_loop(oracle, torch.randn(1, 1, 40, 100, generator=gen), gen).flatten()
    assert abs(x.mean().item() - m) < 4 * s / math.sqrt(4000)
    assert abs(x.std().item() / s - 1) < 0.06


def test_sampling_is_deterministic_under_a_generator():
    d = GaussianDiffusion.linear(100).respace("10")

    def model(x, t):
        return torch.cat([0.1 * x, torch.zeros_like(x)], 1)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return d.sample_loop(model, torch.randn(2, 1, 2, 2, generator=g), g)

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_fixed_variance_is_beta_with_posterior_variance_at_t0():
    """learn_sigma=False is DDPM's "fixed large": log beta_t, with beta~_1 at t = 0 (OpenAI's
    ``np.append(posterior_variance[1], betas[1:])``)."""
    d = GaussianDiffusion.linear(1000, learn_sigma=False)
    betas, abar = np_schedule()
    post1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    want = np.log(np.append(post1, betas[1:]))
    t = torch.tensor([0, 1, 2, 500, 999])
    x = torch.randn(5, 2, 3, 3)
    out = d.p_mean_variance(torch.zeros_like(x), x, t)
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].double().numpy(), want[t.numpy()], rtol=1e-6)
    assert not np.allclose(want[t.numpy()][1:], np.log(betas[t.numpy()][1:] * (1 - abar[t.numpy() - 1][1:])
                                                       / (1 - abar[t.numpy()][1:])))  # beta != beta~ there


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_noise_is_eta_times_the_posterior_std(eta):
    """Song et al. eq. 16: sigma_t = eta * sqrt(beta~_t); eta = 1 is ancestral DDPM's variance."""
    d = GaussianDiffusion.linear(1000, learn_sigma=False)
    betas, abar = np_schedule()
    t = torch.tensor([1, 500, 999])
    x = torch.randn(3, 2, 3, 3, dtype=torch.float32)
    eps = torch.randn(3, 2, 3, 3)
    got = d.ddim_sample(lambda x_, t_: eps, x, t, torch.Generator().manual_seed(5), eta=eta)["sample"].double()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).double()
    ab, ab_prev = abar[t.numpy()], abar[t.numpy() - 1]
    sigma2 = eta ** 2 * betas[t.numpy()] * (1 - ab_prev) / (1 - ab)
    v = lambda a: torch.from_numpy(a).view(-1, 1, 1, 1)  # noqa: E731
    x0 = (x.double() - v(np.sqrt(1 - ab)) * eps.double()) / v(np.sqrt(ab))
    want = x0 * v(np.sqrt(ab_prev)) + v(np.sqrt(1 - ab_prev - sigma2)) * eps.double() + v(np.sqrt(sigma2)) * noise
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
