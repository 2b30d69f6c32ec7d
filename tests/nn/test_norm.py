"""Folding an eval-mode batch norm into the convolution before it (hieratok.nn.norm)."""

import pytest
import torch
from torch import nn

from hieratok.nn.norm import fold_batchnorm, fold_batchnorm_into


@pytest.mark.parametrize("bias", [False, True])
def test_fold_batchnorm_equals_conv_then_bn(bias):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=bias).double()
    bn = nn.BatchNorm2d(7, eps=1e-3).double().eval()
    with torch.no_grad():  # statistics far from the identity, so a missed term shows
        for t, lo, hi in ((bn.running_mean, -2, 2), (bn.running_var, 0.1, 3), (bn.weight, 0.5, 2), (bn.bias, -1, 1)):
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    x = torch.randn(3, 5, 6, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = bn(conv(x))
    fold_batchnorm(conv, bn)
    assert conv.bias is not None and conv.weight.requires_grad and conv.bias.requires_grad  # flags kept
    with torch.no_grad():
        # float64: the fold only reorders products, so the two agree to ~1e-15 of their scale
        torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)


def test_fold_batchnorm_into_replaces_the_norm_once():
    g = torch.Generator().manual_seed(1)
    m = nn.Sequential()
    m.conv, m.bn = nn.Conv2d(3, 4, 1).double(), nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        m.bn.running_var.copy_(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
        m.bn.running_mean.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        fold_batchnorm_into(m, "conv", "bn")
        assert isinstance(m.bn, nn.Identity)
        w = m.conv.weight.clone()
        fold_batchnorm_into(m, "conv", "bn")  # already folded: the weights stay as they are
        assert torch.equal(m.conv.weight, w)
        torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
