import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy

from hieratok.metrics.codebook import codebook_stats
from hieratok.quantizers import VectorQuantizer


def _vq(l2: bool, K: int = 64, D: int = 6, seed: int = 0) -> VectorQuantizer:
    torch.manual_seed(seed)
    vq = VectorQuantizer(K, D, l2_normalized=l2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    return vq


@pytest.mark.parametrize("l2", [True, False])
def test_nearest_code_matches_brute_force(gen, l2):
    vq = _vq(l2)
    z = torch.randn(3, 50, 6, generator=gen)
    idx = vq.encode(z)
    zz = F.normalize(z.double(), dim=-1) if l2 else z.double()
    e = vq.embedding.weight.double()
    e = F.normalize(e, dim=-1) if l2 else e
    d = torch.cdist(zz.reshape(-1, 6), e)  # (150, K)
    chosen = d.gather(1, idx.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, d.min(dim=1).values, atol=1e-5, rtol=0)  # ties allowed
    assert (idx.reshape(-1) == d.argmin(dim=1)).float().mean() > 0.99
    out = vq(z)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.quantized, vq.decode(idx))


def test_decode_values_and_errors():
    vq = _vq(True)
    idx = torch.tensor([[0, 5], [63, 1]])
    torch.testing.assert_close(vq.decode(idx), F.normalize(vq.embedding.weight[idx], dim=-1))
    with pytest.raises(ValueError, match="lie in"):
        vq.decode(torch.tensor([64]))
    with pytest.raises(TypeError):
        vq.decode(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="shape"):
        vq(torch.randn(2, 5))


@pytest.mark.parametrize("l2", [True, False])
def test_losses_closed_form(gen, l2):
    vq = _vq(l2)
    z = torch.randn(4, 7, 6, generator=gen)
    out = vq(z)
    zz = F.normalize(z, dim=-1) if l2 else z
    q = vq.decode(out.indices)
    mse = (q - zz).square().mean()
    torch.testing.assert_close(out.commitment_loss, mse)
    torch.testing.assert_close(out.codebook_loss, mse)
    torch.testing.assert_close(out.loss, 1.25 * mse)


@pytest.mark.parametrize("l2", [True, False])
def test_straight_through_gradients(gen, l2):
    vq = _vq(l2)
    z = torch.randn(5, 6, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, generator=gen)
    (vq(z).quantized * w).sum().backward()
    # value-wise the output is q; gradient-wise it is (normalised) z
    z2 = z.detach().clone().requires_grad_(True)
    ((F.normalize(z2, dim=-1) if l2 else z2) * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    assert vq.embedding.weight.grad is None or vq.embedding.weight.grad.abs().sum() == 0

    # the codebook learns only through the codebook loss; the encoder through commitment
    vq.zero_grad()
    z.grad = None
    out = vq(z)
    out.codebook_loss.backward()
    assert z.grad is None and vq.embedding.weight.grad.abs().sum() > 0
    used = set(out.indices.tolist())
    unused = [k for k in range(vq.codebook_size) if k not in used]
    assert vq.embedding.weight.grad[unused].abs().sum() == 0


def test_usage_tracking_reports_entropy(gen):
    vq = _vq(True, K=16, D=4)
    with pytest.raises(RuntimeError):
        vq.usage_stats()
    vq.track_usage(True)
    seen = []
    for _ in range(3):
        out = vq(torch.randn(40, 4, generator=gen))
        seen.append(out.indices)
    stats = vq.usage_stats()
    counts = torch.bincount(torch.cat(seen), minlength=16).double()
    assert stats.num_tokens == 120 and stats.num_used == int((counts > 0).sum())
    assert math.isclose(stats.entropy_nats, entropy(counts.numpy()), rel_tol=1e-9)
    assert stats == codebook_stats(counts)
    vq.reset_usage()
    vq(torch.randn(2, 4, generator=gen))
    assert vq.usage_stats().num_tokens == 2
