"""Seeded draws with a CPU ``torch.Generator``: same numbers as before on CPU, and on CUDA tensors
(where a device mismatch used to raise) the same numbers as on CPU."""

import pytest
import torch

from hieratok.distributions import DiagonalGaussian
from hieratok.generators.autoregressive import sample_logits
from hieratok.generators.llamagen import GPT

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_sample_logits_on_cpu_is_plain_multinomial():
    """The official sampler's stream: torch.multinomial over the (rows, V) probabilities in row order."""
    logits = torch.randn(3, 5, 40)
    got = sample_logits(logits, temperature=1.3, generator=torch.Generator().manual_seed(4))
    probs = (logits / 1.3).softmax(-1).reshape(15, 40)
    want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(4)).view(3, 5)
    assert torch.equal(got, want)


def test_cpu_draws_are_the_direct_torch_draws():
    post = DiagonalGaussian(torch.randn(2, 8, 3, 3))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(1)), post.mean + post.std * eps,
                               rtol=0, atol=0)
    m = GPT(GPT.preset_config("gpt-tiny", class_dropout=0.5))
    labels = torch.arange(64) % 10
    u = torch.rand(64, generator=torch.Generator().manual_seed(2))
    want = torch.where(u < 0.5, torch.full_like(labels, m.null_class), labels)
    assert torch.equal(m.drop_labels(labels, torch.Generator().manual_seed(2)), want)


@cuda
def test_cpu_generator_drives_cuda_tensors_like_cpu_ones():
    logits = torch.randn(4, 7, 50)
    a = sample_logits(logits, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = sample_logits(logits.cuda(), top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert b.device.type == "cuda" and torch.equal(a, b.cpu())

    params = torch.randn(2, 8, 3, 3)
    a = DiagonalGaussian(params).sample(torch.Generator().manual_seed(1))
    b = DiagonalGaussian(params.cuda()).sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b.cpu())

    m = GPT(GPT.preset_config("gpt-tiny", class_dropout=0.5))
    labels = torch.arange(64) % 10
    a = m.drop_labels(labels, torch.Generator().manual_seed(2))
    b = m.cuda().drop_labels(labels.cuda(), torch.Generator().manual_seed(2))
    assert torch.equal(a, b.cpu())
