"""The prepacked-weight CPU path of hieratok.nn.linear.Linear against F.linear (its reference path)."""

import pytest
import torch
import torch.nn.functional as F

from hieratok.nn import linear as linear_mod
from hieratok.nn.linear import ENV, Linear, available_backends, pack_weight, packed_backend

BACKENDS = available_backends()
needs_packing = pytest.mark.skipif(not BACKENDS, reason="this torch build has no packed gemm")


@pytest.fixture(params=BACKENDS or ["none"])
def backend(request, monkeypatch):
    """Each packed gemm of this build in turn, as the process's choice."""
    monkeypatch.setenv(ENV, request.param)
    monkeypatch.setattr(linear_mod, "_CHOICE", {})
    return request.param


@needs_packing
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (8, 48), (513, 48), (3, 5, 48)])
def test_packed_path_matches_f_linear(gen, bias, shape, backend):
    lin = Linear(48, 40, bias=bias).eval()
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        out = lin(x)
        assert lin._pack is not None and lin._pack[0] == backend  # the packed path ran
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert out.shape == (*shape[:-1], 40)


@needs_packing
def test_pack_follows_weight_updates(gen, backend):
    lin = Linear(16, 8).eval()
    x = torch.randn(4, 16, generator=gen)
    with torch.no_grad():
        lin(x)
        first = lin._pack
        lin.weight.mul_(-2.0)  # in-place update (an optimizer step): the version counter moves
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
        assert lin._pack is not first
        lin.load_state_dict({"weight": torch.randn(8, 16, generator=gen), "bias": torch.zeros(8)})
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


def test_reference_path_training_and_state_dict(gen):
    lin = Linear(6, 4)
    assert set(lin.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 6, generator=gen, requires_grad=True)
    lin(x).sum().backward()  # autograd on: plain F.linear, gradients flow
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 6))
    assert lin._pack is None
    lin.fast = False
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert lin._pack is None


@needs_packing
def test_pack_is_dropped_in_training_mode_so_fused_adamw_steps_are_seen(gen, backend):
    lin = Linear(16, 8).eval()
    x = torch.randn(4, 16, generator=gen)
    with torch.no_grad():
        lin(x)
    assert lin._pack is not None
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)  # updates in place, version counter unmoved
    lin.train()
    assert lin._pack is None
    lin(x).square().sum().backward()
    opt.step()
    lin.eval()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
        lin.train()
        lin(x)  # training mode: no pack is made, even without autograd
    assert lin._pack is None


@needs_packing
def test_autocast_takes_the_reference_path(gen, backend):
    lin = Linear(16, 8).eval()
    x = torch.randn(4, 16, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
        assert out.dtype == torch.bfloat16 and lin._pack is None
        assert torch.equal(out, F.linear(x, lin.weight, lin.bias))


def test_pack_weight_declines_what_it_cannot_pack():
    assert pack_weight(torch.randn(4, 3, dtype=torch.float64)) is None
    assert pack_weight(torch.randn(2, 4, 3)) is None


def test_backend_choice_from_the_environment_or_one_probe(gen, monkeypatch):
    monkeypatch.setattr(linear_mod, "_CHOICE", {})
    monkeypatch.setenv(ENV, "off")
    assert packed_backend() is None
    lin = Linear(16, 8).eval()
    x = torch.randn(4, 16, generator=gen)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and lin._pack is None
    monkeypatch.setattr(linear_mod, "_CHOICE", {})
    monkeypatch.setenv(ENV, "blas-from-mars")
    with pytest.raises(ValueError, match="HIERATOK_PACKED_LINEAR='blas-from-mars'"):
        packed_backend()
    monkeypatch.setattr(linear_mod, "_CHOICE", {})
    monkeypatch.delenv(ENV)
    timed = []
    real = linear_mod._time_backend
    monkeypatch.setattr(linear_mod, "_time_backend", lambda b, x, w: timed.append(b) or real(b, x, w))
    choice = packed_backend()
    assert choice in (None, *BACKENDS) and sorted(map(str, timed)) == sorted(map(str, (None, *BACKENDS)))
    assert packed_backend() == choice and len(timed) == len(BACKENDS) + 1  # chosen once per process
