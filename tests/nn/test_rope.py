import math

import pytest
import torch

from hieratok.nn.rope import (
    apply_rope,
    apply_rope_reference,
    grid_positions,
    mixed_positions,
    rope_angles,
    rope_frequencies,
    rope_table,
    rotate_pairs,
)


def _complex_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Independent 1D RoPE: pairs as complex numbers multiplied by exp(i pos omega_j)."""
    K = x.shape[-1]
    omega = torch.tensor([theta ** (-2 * j / K) for j in range(K // 2)], dtype=torch.float64)
    rot = torch.polar(torch.ones_like(omega), pos.double()[:, None] * omega[None])  # (L, K/2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], K // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(x.shape)


def test_frequencies_closed_form():
    f = rope_frequencies(8, 100.0)
    torch.testing.assert_close(f, torch.tensor([1.0, 100 ** -0.25, 100 ** -0.5, 100 ** -0.75], dtype=torch.float64))
    with pytest.raises(ValueError):
        rope_frequencies(7)


def test_1d_rope_matches_complex_rotation(gen):
    x = torch.randn(2, 3, 10, 16, generator=gen, dtype=torch.float64)
    pos = torch.arange(10) * 3 + 1
    out = apply_rope(x, rope_table(pos, [16]))
    torch.testing.assert_close(out, _complex_rope(x, pos).to(out.dtype), atol=1e-6, rtol=1e-6)
    # a rotation keeps norms
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-6, rtol=1e-6)


def test_dot_product_depends_only_on_position_difference(gen):
    q = torch.randn(1, 1, 1, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 32, generator=gen, dtype=torch.float64)

    def score(pq, pk):
        rq = apply_rope(q, rope_table(torch.tensor([pq]), [32]))
        rk = apply_rope(k, rope_table(torch.tensor([pk]), [32]))
        return (rq * rk).sum().item()

    for delta in (0, 3, -7):
        vals = [score(p + delta, p) for p in (0, 5, 40, 123)]
        assert max(vals) - min(vals) < 1e-5, vals
    assert abs(score(3, 0) - score(0, 3)) > 1e-4  # and it does depend on the difference (sign matters)


def test_2d_relative_property(gen):
    q = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64)

    def score(pq, pk):
        rq = apply_rope(q, rope_table(torch.tensor([pq]), [8, 8]))
        rk = apply_rope(k, rope_table(torch.tensor([pk]), [8, 8]))
        return (rq * rk).sum().item()

    base = score((4, 9), (1, 2))
    assert abs(score((10, 17), (7, 10)) - base) < 1e-5  # same (3, 7) offset
    assert abs(score((4, 10), (1, 2)) - base) > 1e-5  # a different column offset


def test_2d_rope_is_1d_rope_on_row_and_column_halves(gen):
    x = torch.randn(2, 4, 12, 24, generator=gen)
    pos = grid_positions(3, 4)
    out = apply_rope(x, rope_table(pos, [12, 12], theta=100.0))
    rows = apply_rope(x[..., :12], rope_table(pos[:, 0], [12], theta=100.0))
    cols = apply_rope(x[..., 12:], rope_table(pos[:, 1], [12], theta=100.0))
    torch.testing.assert_close(out, torch.cat((rows, cols), dim=-1))


def test_angles_concatenate_axes():
    pos = torch.tensor([[2, 5]])
    a = rope_angles(pos, [4, 4], theta=10.0)[0]
    expect = [2.0, 2.0 / math.sqrt(10.0), 5.0, 5.0 / math.sqrt(10.0)]
    torch.testing.assert_close(a, torch.tensor(expect, dtype=torch.float64))


def test_mixed_positions_layouts():
    p = mixed_positions([(1, 2), (2, 2)], 2, tokens_first=False)
    assert p.tolist() == [[0, 0], [0, 1], [2, 2], [2, 3], [3, 2], [3, 3], [6, 6], [7, 7]]
    p = mixed_positions([(2, 2)], 3, tokens_first=True)
    assert p.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3], [3, 4], [4, 3], [4, 4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_complex_rope_equals_the_real_rotation(gen, dtype):
    qkv = torch.randn(2, 7, 3, 4, 8, generator=gen, dtype=dtype)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # a strided view, as inside attention
    table = rope_table(torch.randn(7, 2, generator=gen) * 20, [4, 4])
    ref = apply_rope_reference(q.double(), table)  # float32 math on a float64 copy
    torch.testing.assert_close(apply_rope(q, table).double(), ref, atol=1e-6, rtol=1e-6)
    assert apply_rope(q, table).dtype == dtype


def test_rotate_pairs_falls_back_for_bf16_and_odd_layouts(gen):
    x = torch.randn(3, 5, 8, generator=gen)
    cos, sin = torch.rand(5, 4, generator=gen), torch.rand(5, 4, generator=gen)
    for y in (x.bfloat16(), x[:, :, 1:7]):  # no complex view: bf16, and pairs starting at an odd offset
        out = rotate_pairs(y, cos[:, : y.shape[-1] // 2], sin[:, : y.shape[-1] // 2])
        x0, x1 = y.float()[..., 0::2], y.float()[..., 1::2]
        c, s = cos[:, : y.shape[-1] // 2], sin[:, : y.shape[-1] // 2]
        want = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)
        torch.testing.assert_close(out.float(), want, atol=1e-2 if y.dtype == torch.bfloat16 else 1e-6, rtol=0)


def test_float32_angles_are_llamagens():
    """LlamaGen computes ``1 / base^(2i/K)`` and the angles in float32 (its weights expect them):
    the float32 table equals that recipe bit for bit, and the float64 one to float32 rounding."""
    K, base, pos = 64, 10000.0, torch.arange(300)
    freqs = 1.0 / (base ** (torch.arange(0, K, 2)[: K // 2].float() / K))
    ang = torch.outer(pos.float(), freqs)
    cos, sin = rope_table(pos, [K], base, dtype=torch.float32)
    assert torch.equal(cos, ang.cos()) and torch.equal(sin, ang.sin())
    cos64, _ = rope_table(pos, [K], base)
    assert (cos64 - cos).abs().max() < 300 * 2 ** -23  # angles up to 300 rad carry float32 rounding
