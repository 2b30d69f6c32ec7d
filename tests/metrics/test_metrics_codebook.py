"""Codebook statistics against closed forms and scipy."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from hieratok.metrics import CodebookUsage, codebook_stats, shared_code_fraction


def test_uniform_use_closed_form():
    k = 64
    acc = CodebookUsage(k).update(torch.arange(k).repeat(5).view(20, 16))
    s = acc.compute()
    assert s.num_tokens == 5 * k and s.num_used == k and s.usage == 1.0
    assert s.perplexity == pytest.approx(k, rel=1e-12)
    assert s.entropy_nats == pytest.approx(math.log(k), rel=1e-12)
    assert s.entropy_bits == pytest.approx(6.0, rel=1e-12)
    assert s.normalized_entropy == pytest.approx(1.0, rel=1e-12)


def test_single_code_and_half_codebook():
    s = CodebookUsage(10).update(torch.full((7,), 3)).compute()
    assert (s.usage, s.num_used, s.entropy_nats, s.perplexity, s.normalized_entropy) == (0.1, 1, 0.0, 1.0, 0.0)
    s = CodebookUsage(16).update(torch.arange(0, 16, 2)).compute()  # 8 of 16 codes, uniformly
    assert s.usage == 0.5
    assert s.perplexity == pytest.approx(8.0, rel=1e-12)
    assert s.normalized_entropy == pytest.approx(0.75, rel=1e-12)  # log 8 / log 16


def test_streaming_and_merge_match_scipy():
    g = torch.Generator().manual_seed(0)
    k = 100
    idx = torch.multinomial(torch.rand(k, generator=g) ** 3, 5000, replacement=True, generator=g)
    a, b = CodebookUsage(k), CodebookUsage(k)
    for chunk in idx[:3000].split(700):
        a.update(chunk)
    b.update(idx[3000:])
    s = a.merge(b).compute()
    counts = np.bincount(idx.numpy(), minlength=k)
    h = scipy_entropy(counts)  # nats
    assert s.entropy_nats == pytest.approx(h, rel=1e-12)
    assert s.entropy_bits == pytest.approx(scipy_entropy(counts, base=2), rel=1e-12)
    assert s.perplexity == pytest.approx(math.exp(h), rel=1e-12)
    assert s.num_used == int((counts > 0).sum())
    assert codebook_stats(torch.from_numpy(counts)) == s


def test_bad_indices():
    acc = CodebookUsage(8)
    with pytest.raises(ValueError):
        acc.update(torch.tensor([0, 8]))
    with pytest.raises(ValueError):
        acc.update(torch.tensor([-1]))
    with pytest.raises(TypeError):
        acc.update(torch.tensor([0.5]))
    with pytest.raises(ValueError):
        acc.compute()  # nothing counted


def test_shared_code_fraction_counts_positions_common_to_every_sequence():
    idx = torch.tensor([[1, 2, 3, 7], [1, 5, 3, 7], [1, 2, 4, 7]])
    assert shared_code_fraction(idx).item() == 0.5  # positions 0 and 3
    assert shared_code_fraction(idx[:, 1:3]).item() == 0.0
    assert shared_code_fraction(idx[[0, 0]]).item() == 1.0
    with pytest.raises(ValueError, match="B >= 2"):
        shared_code_fraction(idx[:1])
