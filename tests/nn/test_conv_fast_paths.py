"""Fast paths of the MaskGIT CNN (hieratok.nn.conv_autoencoder) against their reference paths."""

import pytest
import torch
import torch.nn.functional as F

from hieratok.nn.conv_autoencoder import (
    ConvDecoder,
    ConvEncoder,
    ConvResBlock,
    upsample_conv,
    upsample_conv_phase_weight,
)

SMALL = dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, groups=8)


def _set(model, fast):
    model.channels_last = fast
    if isinstance(model, ConvDecoder):
        model.fused_upsample = fast
    for m in model.modules():
        if isinstance(m, ConvResBlock):
            m.inplace_act = fast


def _randomize(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.15 if p.ndim > 1 else 0.3) + (1.0 if p.ndim == 1 else 0.0))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_equals_nearest_upsample_then_conv(gen, bias, channels_last):
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias).double()
    x = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = upsample_conv(x, conv)
    assert out.shape == (2, 5, 10, 14)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_phase_kernels_sum_to_the_3x3_kernel_four_times(gen):
    """Every 3x3 tap is used once per phase: the four 2x2 kernels of a phase add up to the 3x3 sum."""
    w = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64)
    ph = upsample_conv_phase_weight(w).view(4, 3, 4, 2, 2)
    torch.testing.assert_close(ph.sum((-1, -2)), w.sum((-1, -2)).expand(4, 3, 4))
    torch.testing.assert_close(ph[0, :, :, 0, 0], w[:, :, 0, 0])  # phase (0, 0): top-left tap alone
    torch.testing.assert_close(ph[3, :, :, 1, 1], w[:, :, 2, 2])  # phase (1, 1): bottom-right tap alone


def test_upsample_conv_gradients_match(gen):
    conv = torch.nn.Conv2d(4, 3, 3, padding=1).double()
    x = torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (lambda: upsample_conv(x, conv), lambda: conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))):
        x.grad, conv.weight.grad, conv.bias.grad = None, None, None
        (fn() * g).sum().backward()
        grads.append((x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cls,shape", [(ConvEncoder, (2, 3, 32, 32)), (ConvDecoder, (2, 16, 8, 8))])
def test_cnn_fast_paths_match_the_reference_paths(gen, cls, shape):
    model = cls(3, **SMALL).eval()
    _randomize(model, gen)
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        _set(model, False)
        ref = model(x)
        _set(model, True)
        fast = model(x)
    assert fast.is_contiguous() and fast.shape == ref.shape
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not torch.equal(x, torch.zeros_like(x))  # the input is not consumed by the in-place ops


def test_in_place_ops_stay_off_while_autograd_records(gen):
    """With gradients enabled the fast paths must give the reference gradients (no in-place error)."""
    model = ConvDecoder(3, **SMALL)
    _randomize(model, gen)
    z = torch.randn(1, 16, 4, 4, generator=gen)
    grads = []
    for fast in (False, True):
        _set(model, fast)
        model.zero_grad()
        model(z).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8


def test_conv_add_equals_conv_then_add(gen):
    from hieratok.nn.conv_autoencoder import conv_add_

    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    cl = torch.channels_last
    x = torch.randn(2, 8, 9, 11, generator=gen).contiguous(memory_format=cl)
    acc = torch.randn(2, 8, 9, 11, generator=gen).contiguous(memory_format=cl)
    with torch.no_grad():
        ref = acc + conv(x)
        out = conv_add_(acc, x, conv)
    assert out.data_ptr() == acc.data_ptr()  # written in place
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_res_block_overwrites_its_input_only_when_it_owns_it(gen):
    blk = ConvResBlock(8, 8, groups=4).eval()
    x = torch.randn(2, 8, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    keep = x.clone()
    with torch.no_grad():
        ref = blk(x)
        assert torch.equal(x, keep)  # not owned: untouched
        out = blk(x, owns_input=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.data_ptr() == x.data_ptr()  # owned: the residual sum reused the input's memory
