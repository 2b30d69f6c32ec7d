"""The prepacked-weight CPU path of hieratok.nn.linear.Linear against F.linear (its reference path)."""

import pytest
import torch
import torch.nn.functional as F

from hieratok.nn import linear as linear_mod
from hieratok.nn.linear import ENV, Linear, available_backends, pack_weight, packed_backend
from hieratok.precision import native_on_cpu

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_keeps_the_cast_weight_and_matches_autocasts_own_result(gen, dtype, bias):
    lin = Linear(64, 48, bias=bias).eval()
    x = torch.randn(5, 64, generator=gen)

    def reference() -> torch.Tensor:  # F.linear under autocast: the weight cast on this call
        lin.fast = False
        out = lin(x)
        lin.fast = True
        return out

    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out, ref = lin(x), reference()
        pack, cast = lin._packs[dtype][1:]
        assert out.dtype == dtype and lin._pack is None  # no float32 pack under autocast
        if pack is None:  # the kept cast through autocast's own F.linear: the same bits
            assert torch.equal(out, ref) and cast.dtype == dtype
        else:  # oneDNN's bf16 inner product: the same products, rounded to bf16 at the end
            assert cast is None and pack[0] == "onednn"
            torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7 * float(ref.abs().max()))
        lin(x)
        assert lin._packs[dtype][1] is pack and lin._packs[dtype][2] is cast  # made once, not per call
        lin.weight.mul_(-2.0)  # an in-place update: made again
        out = lin(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # a new context: autocast's own cast cache is cleared
        torch.testing.assert_close(out.float(), reference().float(), rtol=2 ** -7, atol=2 ** -6 * float(ref.abs().max()))
    lin.train()
    assert lin._packs == {}


@pytest.mark.skipif("onednn" not in BACKENDS, reason="needs oneDNN's packed inner product")
def test_a_bf16_pack_is_made_only_when_it_measures_faster(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(linear_mod, "_CHOICE", {})
    fake = {None: 2.0, "onednn": 1.0}
    monkeypatch.setattr(linear_mod, "_time_backend", lambda b, x, w: fake[b] if x.dtype == torch.bfloat16 else 0.0)
    assert packed_backend(torch.bfloat16) == "onednn"
    packed = pack_weight(torch.randn(8, 16, dtype=torch.bfloat16))
    if native_on_cpu("bf16"):  # elsewhere oneDNN may have no bf16 inner product: then no pack (None)
        assert packed[0] == "onednn"
    assert packed is None or packed[0] == "onednn"
    monkeypatch.setattr(linear_mod, "_CHOICE", {})
    fake.update({None: 1.0, "onednn": 2.0})
    assert packed_backend(torch.bfloat16) is None and pack_weight(torch.randn(8, 16, dtype=torch.bfloat16)) is None
    monkeypatch.setattr(linear_mod, "_CHOICE", {})
    monkeypatch.setenv(ENV, "mkl")  # MKL packs float32 only
    if "mkl" in BACKENDS:
        assert packed_backend(torch.bfloat16) is None


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
