"""Fast paths of hieratok.nn vs their reference paths: segmented masked attention, in-place GELU."""

import pytest
import torch

from hieratok.nn.attention import SegmentedMask, attention, attention_reference, resolve_mask
from hieratok.nn.masks import MaskSpec
from hieratok.nn.mlp import Mlp
from hieratok.nn.transformer import Transformer, set_fast_paths

MODES = ["scale_causal", "scale_independent", "full"]


def _rebuild(seg: SegmentedMask) -> torch.Tensor:
    """The dense mask a segment list describes (independent of how it was computed)."""
    Lq, Lk = seg.dense.shape
    out = torch.zeros(Lq, Lk, dtype=torch.bool)
    covered = torch.zeros(Lq, dtype=torch.int64)
    for s in seg.segments:
        out[s.q0:s.q1, s.k0:s.k1] = True if s.mask is None else s.mask
        covered[s.q0:s.q1] += 1
    assert torch.equal(covered, torch.ones(Lq, dtype=torch.int64)), "segments must cover every query once"
    return out


def _sdpa_form(spec, q0=0, q1=None):
    return resolve_mask(spec, "sdpa", "cpu", q0, q1)


@pytest.mark.parametrize("scales", [(1, 2, 4, 8), (1, 2, 4, 8, 16), (1, 3, 5), (2, 4, 6, 12)])
@pytest.mark.parametrize("mode", ["scale_causal", "scale_independent"])
def test_segmented_form_describes_the_mask_exactly(mode, scales):
    spec = MaskSpec.for_scales(mode, scales)
    seg = _sdpa_form(spec)
    assert isinstance(seg, SegmentedMask)
    assert torch.equal(seg.dense, spec.dense()) and torch.equal(_rebuild(seg), spec.dense())
    L = spec.length
    rows = _sdpa_form(spec, 1, L)  # the rows of a last layer that computes only some queries
    assert torch.equal(_rebuild(rows), spec.dense()[1:])


def test_resolved_forms_per_backend_and_rows():
    spec = MaskSpec.for_scales("scale_causal", (1, 2, 4))
    assert _sdpa_form(spec) is _sdpa_form(spec)  # built once per spec, backend, device and rows
    dense = resolve_mask(spec, "sdpa", "cpu", segmented=False)  # the reference path: the dense tensor
    assert isinstance(dense, torch.Tensor) and torch.equal(dense, spec.dense())
    assert torch.equal(resolve_mask(spec, "reference", "cpu"), spec.dense())
    assert resolve_mask(spec, "sdpa", "cpu", 5, 21) is None  # the finest scale sees every key: no mask
    assert resolve_mask(MaskSpec.for_scales("full", (1, 2, 4)), "reference", "cpu") is None
    meta = resolve_mask(spec, "sdpa", "meta")  # structure only: works without data
    assert isinstance(meta, SegmentedMask) and meta.dense.is_meta
    causal = resolve_mask(MaskSpec.causal(4000), "sdpa", "cpu")
    assert isinstance(causal, torch.Tensor)  # more than 16 segments: one dense masked call
    m = torch.ones(3, 3, dtype=torch.bool)
    assert resolve_mask(m, "sdpa", "cpu") is m and resolve_mask(None, "sdpa", "cpu") is None


def _qkv(gen, L, B=2, H=3, K=16, requires_grad=False):
    qkv = torch.randn(B, L, 3, H, K, generator=gen, requires_grad=requires_grad)
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as in Attention


@pytest.mark.parametrize("scales", [(1, 2, 4, 8), (1, 2, 4, 8, 16), (1, 3, 5)])
@pytest.mark.parametrize("mode", MODES)
def test_segmented_sdpa_matches_reference(gen, mode, scales):
    spec = MaskSpec.for_scales(mode, scales)
    m = spec.dense()
    _, (q, k, v) = _qkv(gen, m.shape[0])
    ref = attention_reference(q.double(), k.double(), v.double(), m)
    fast = attention(q, k, v, _sdpa_form(spec), "sdpa")
    dense = attention(q, k, v, m, "sdpa")
    assert fast.shape == ref.shape
    assert (fast.double() - ref).abs().max() < 1e-5
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)


def test_segmented_sdpa_on_block_sizes_of_a_restok_encoder(gen):
    spec = MaskSpec((16, 32, 1, 1, 2, 4, 8, 16))
    _, (q, k, v) = _qkv(gen, spec.length)
    ref = attention_reference(q.double(), k.double(), v.double(), spec.dense())
    assert (attention(q, k, v, _sdpa_form(spec), "sdpa").double() - ref).abs().max() < 1e-5


def test_segmented_backward_matches_dense(gen):
    spec = MaskSpec.for_scales("scale_causal", (1, 2, 4, 8, 16))
    m = spec.dense()
    grads = []
    for mask in (_sdpa_form(spec), m):
        torch.manual_seed(0)
        qkv, (q, k, v) = _qkv(torch.Generator().manual_seed(1), m.shape[0], requires_grad=True)
        out = attention(q, k, v, mask, "sdpa")
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        grads.append(qkv.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_non_sdpa_backends_read_the_dense_form(gen):
    spec = MaskSpec.for_scales("scale_causal", (1, 2, 4))
    m = spec.dense()
    _, (q, k, v) = _qkv(gen, m.shape[0])
    torch.testing.assert_close(attention(q, k, v, _sdpa_form(spec), "reference"), attention_reference(q, k, v, m))


@pytest.mark.parametrize("mode", ["scale_causal", "scale_independent"])
def test_transformer_fast_path_matches_reference_path(gen, mode):
    torch.manual_seed(0)
    net = Transformer(depth=2, dim=32, num_heads=4)
    m = MaskSpec.for_scales(mode, (1, 2, 4, 8))
    x = torch.randn(2, m.length, 32, generator=gen)
    outs, grads = [], []
    for fast in (True, False):
        set_fast_paths(net, fast)
        net.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = net(xi, m)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inplace_gelu_matches_reference(gen):
    torch.manual_seed(0)
    mlp = Mlp(24, 96)
    x = torch.randn(3, 7, 24, generator=gen)
    ref = mlp(x)  # autograd on: reference path
    assert ref.requires_grad
    with torch.no_grad():
        fast = mlp(x)
    with torch.inference_mode():
        fast_inf = mlp(x)
        mlp.inplace_act = False
        plain = mlp(x)
    assert torch.equal(fast, ref.detach()) and torch.equal(fast_inf, ref.detach()) and torch.equal(plain, fast)
    mlp.inplace_act = True
    mlp.act = torch.nn.GELU(approximate="tanh")
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh")))


def test_mlp_row_chunks_match_one_pass(gen, monkeypatch):
    mlp = Mlp(24, 96, bias=True)
    x = torch.randn(5, 7, 24, generator=gen)
    with torch.no_grad():
        whole = mlp(x)
        monkeypatch.setattr(Mlp, "CHUNK_BYTES", 96 * 4 * 6)  # 6 rows of hidden per chunk: 6 chunks
        calls = []
        hook = mlp.fc1.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
        chunked = mlp(x)
        hook.remove()
        assert calls == [6] * 5 + [5]  # 35 rows in 6 chunks
        mlp.inplace_act = False
        ref = mlp(x)
    assert chunked.shape == (5, 7, 24)
    torch.testing.assert_close(chunked, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whole, ref, atol=1e-6, rtol=1e-6)
