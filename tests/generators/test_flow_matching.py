import numpy as np
import pytest
import torch
from scipy import stats

from hieratok.generators import FlowMatching


def test_interpolant_direction(gen):
    x0, eps = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    f = FlowMatching()
    torch.testing.assert_close(f.interpolate(x0, eps, torch.zeros(3)), x0)  # t = 0: data
    torch.testing.assert_close(f.interpolate(x0, eps, torch.ones(3)), eps)  # t = 1: noise
    t = torch.tensor([0.25, 0.5, 0.9])
    torch.testing.assert_close(f.interpolate(x0, eps, t), (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    # The target is the time derivative of the path.
    h = 1e-3
    fd = (f.interpolate(x0, eps, t + h) - f.interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, f.velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_loss_closed_form_for_a_known_model(gen):
    f = FlowMatching(time_scale=1000.0)
    x0 = torch.randn(6, 2, 3, 3, generator=gen)
    seen = {}

    def model(x, t_model):
        seen["t"] = t_model
        return 0.5 * x + 0.001 * t_model.view(-1, 1, 1, 1)

    terms = f.training_losses(model, x0, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = torch.rand(6, generator=g)  # t first, then noise
    eps = torch.randn(x0.shape, generator=g)
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * eps
    ref = ((0.5 * xt + tt - (eps - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(terms["loss"], ref)
    torch.testing.assert_close(seen["t"], 1000 * t)
    with pytest.raises(ValueError, match="learn_sigma"):
        f.training_losses(lambda x, t: torch.cat([x, x], 1), x0, g)


def test_t_sampling_distributions():
    n = 20000
    u = FlowMatching("uniform").sample_t(n, torch.Generator().manual_seed(0))
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    ln = FlowMatching("logit_normal", logit_mean=0.3, logit_std=0.8).sample_t(n, torch.Generator().manual_seed(0))
    logits = torch.logit(ln.double()).numpy()
    assert stats.kstest(logits, "norm", args=(0.3, 0.8)).pvalue > 1e-3


@pytest.mark.parametrize("method,steps", [("euler", 1), ("euler", 7), ("heun", 5)])
def test_exact_velocity_gaussian_to_point(method, steps, gen):
    """Point data a: v(x, t) = (x - a) / t; the paths are straight, so both solvers land on a."""
    a = torch.randn(1, 3, 2, 2, generator=gen)
    f = FlowMatching(time_scale=1000.0)
    x = f.sample(lambda x, tm: (x - a) / (tm / 1000).view(-1, 1, 1, 1), torch.randn(4, 3, 2, 2, generator=gen), steps, method)
    torch.testing.assert_close(x, a.expand(4, -1, -1, -1), atol=1e-5, rtol=0)


def test_solver_orders_on_gaussian_to_gaussian(gen):
    """Data N(m, s^2): the exact marginal velocity transports noise z to m + s z. Euler error falls
    like 1/N, Heun like 1/N^2."""
    m, s = 0.7, 0.4
    f = FlowMatching(time_scale=1.0)

    def v(x, t):
        t = t.view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * s * s + t * t
        r = x - (1 - t) * m
        return t / var * r - (m + (1 - t) * s * s / var * r)

    z = torch.randn(64, 1, 1, 1, generator=gen, dtype=torch.float64)
    target = m + s * z
    err = {(meth, n): (f.sample(v, z, n, meth) - target).abs().max().item() for meth in ("euler", "heun") for n in (10, 20, 40)}
    assert err["euler", 40] < err["euler", 20] < err["euler", 10]
    assert 1.6 < err["euler", 20] / err["euler", 40] < 2.4
    assert err["heun", 20] / err["heun", 40] > 3.0
    assert err["heun", 40] < 0.05 * err["euler", 40]


def test_deterministic_under_a_generator():
    f = FlowMatching("logit_normal")
    x0 = torch.randn(4, 2, 2, 2)

    def loss(seed):
        return f.training_losses(lambda x, t: x, x0, torch.Generator().manual_seed(seed))["loss"]

    assert torch.equal(loss(0), loss(0)) and not torch.equal(loss(0), loss(1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="t_sampling"):
        FlowMatching("beta")
    with pytest.raises(ValueError, match="sampler"):
        FlowMatching().sample(lambda x, t: x, torch.zeros(1, 1, 1, 1), 3, "rk4")
    assert np.isfinite(FlowMatching().sample(lambda x, t: x, torch.ones(1, 1, 1, 1), 2, "heun").item())
