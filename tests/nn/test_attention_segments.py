"""Fast paths of hieratok.nn vs their reference paths: segmented masked attention, in-place GELU."""

import pytest
import torch

from hieratok.nn.attention import MaskSegment, SegmentedMask, attention, attention_reference, segment_mask
from hieratok.nn.masks import dense_mask
from hieratok.nn.vit import Mlp, Transformer

MODES = ["scale_causal", "scale_independent", "full"]
SCALE_SETS = [(1, 2, 4, 8), (1, 2, 4, 8, 16), (1, 3, 5), (2, 4, 6, 12)]


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


def _random_mask(gen: torch.Generator, L: int) -> torch.Tensor:
    m = torch.rand(L, L, generator=gen) < 0.3
    return m | torch.eye(L, dtype=torch.bool)  # no empty rows


@pytest.mark.parametrize("scales", SCALE_SETS)
@pytest.mark.parametrize("mode", MODES)
def test_segments_describe_the_mask_exactly(mode, scales):
    m = dense_mask(mode, scales)
    seg = segment_mask(m)
    assert seg is not None
    assert torch.equal(_rebuild(seg), m)


def test_segments_of_the_paper_scale_masks():
    L, fine = 341, 256
    causal = segment_mask(dense_mask("scale_causal", (1, 2, 4, 8, 16)))
    indep = segment_mask(dense_mask("scale_independent", (1, 2, 4, 8, 16)))
    full = segment_mask(dense_mask("full", (1, 2, 4, 8, 16)))
    # the finest scale's queries (3/4 of them) attend to their keys without any mask
    assert causal.segments[-1][:4] == (L - fine, L, 0, L) and causal.segments[-1].mask is None
    assert indep.segments[-1][:4] == (L - fine, L, L - fine, L) and indep.segments[-1].mask is None
    assert len(causal.segments) == len(indep.segments) == 2
    assert full.segments == (MaskSegment(0, L, 0, L, None),)
    pairs = sum((s.q1 - s.q0) * (s.k1 - s.k0) for s in causal.segments)
    assert pairs / L ** 2 == pytest.approx(0.813, abs=1e-3)


def test_segment_mask_general_masks(gen):
    m = _random_mask(gen, 300)
    seg = segment_mask(m)
    assert seg is not None and torch.equal(_rebuild(seg), m)
    causal = torch.ones(1024, 1024, dtype=torch.bool).tril()
    seg = segment_mask(causal)
    assert len(seg.segments) == 8 and torch.equal(_rebuild(seg), causal)
    assert segment_mask(torch.ones(4000, 4000, dtype=torch.bool).tril()) is None  # too many segments
    empty_row = dense_mask("scale_causal", (1, 2, 4)).clone()
    empty_row[3] = False
    assert segment_mask(empty_row) is None
    with pytest.raises(ValueError, match="2-d bool mask"):
        segment_mask(torch.zeros(4, 4))


def _qkv(gen, L, B=2, H=3, K=16, requires_grad=False):
    qkv = torch.randn(B, L, 3, H, K, generator=gen, requires_grad=requires_grad)
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as in Attention


@pytest.mark.parametrize("scales", [(1, 2, 4, 8), (1, 2, 4, 8, 16), (1, 3, 5)])
@pytest.mark.parametrize("mode", MODES)
def test_segmented_sdpa_matches_reference(gen, mode, scales):
    m = dense_mask(mode, scales)
    _, (q, k, v) = _qkv(gen, m.shape[0])
    ref = attention_reference(q.double(), k.double(), v.double(), m)
    fast = attention(q, k, v, segment_mask(m), "sdpa")
    dense = attention(q, k, v, m, "sdpa")
    assert fast.shape == ref.shape
    assert (fast.double() - ref).abs().max() < 1e-5
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)


def test_segmented_sdpa_random_mask(gen):
    m = _random_mask(gen, 300)
    _, (q, k, v) = _qkv(gen, 300)
    ref = attention_reference(q.double(), k.double(), v.double(), m)
    assert (attention(q, k, v, segment_mask(m), "sdpa").double() - ref).abs().max() < 1e-5


def test_segmented_backward_matches_dense(gen):
    m = dense_mask("scale_causal", (1, 2, 4, 8, 16))
    grads = []
    for mask in (segment_mask(m), m):
        torch.manual_seed(0)
        qkv, (q, k, v) = _qkv(torch.Generator().manual_seed(1), m.shape[0], requires_grad=True)
        out = attention(q, k, v, mask, "sdpa")
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        grads.append(qkv.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_non_sdpa_backends_read_the_dense_form(gen):
    m = dense_mask("scale_causal", (1, 2, 4))
    _, (q, k, v) = _qkv(gen, m.shape[0])
    torch.testing.assert_close(attention(q, k, v, segment_mask(m), "reference"), attention_reference(q, k, v, m))


@pytest.mark.parametrize("mode", ["scale_causal", "scale_independent"])
def test_transformer_fast_path_matches_reference_path(gen, mode):
    torch.manual_seed(0)
    net = Transformer(depth=2, dim=32, num_heads=4)
    m = dense_mask(mode, (1, 2, 4, 8))
    x = torch.randn(2, m.shape[0], 32, generator=gen)
    outs, grads = [], []
    for fast in (True, False):
        net.segment_masks = fast
        net.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = net(xi, m)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_transformer_caches_segments_per_mask_object():
    net = Transformer(depth=1, dim=16, num_heads=2)
    m = dense_mask("scale_causal", (1, 2, 4))
    first = net._block_mask(m)
    assert isinstance(first, SegmentedMask) and net._block_mask(m) is first
    other = dense_mask("scale_independent", (1, 2, 4))
    assert torch.equal(net._block_mask(other).dense, other)
    net.segment_masks = False
    assert net._block_mask(m) is m
    assert net._block_mask(None) is None
    meta = dense_mask("scale_causal", (1, 2, 4)).to("meta")
    net.segment_masks = True
    assert net._block_mask(meta) is meta  # nothing to analyse on the meta device


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
