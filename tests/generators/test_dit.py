import math

import numpy as np
import pytest
import torch

from hieratok.generators import (
    DIT_PRESETS,
    DiT,
    DiTConfig,
    LatentNormalizer,
    count_parameters,
    sincos_pos_embed_2d,
    timestep_embedding,
)

TOY = dict(input_size=4, in_channels=4, depth=2, width=32, num_heads=4, num_classes=3)


def make(**kw) -> DiT:
    torch.manual_seed(0)
    m = DiT(DiTConfig(**{**TOY, **kw}))
    # adaLN-Zero makes a fresh model constant; perturb every weight so tests see a real function.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def inputs(gen, B=3, C=4, S=4, num_classes=3):
    x = torch.randn(B, C, S, S, generator=gen)
    t = torch.randint(0, 1000, (B,), generator=gen).float()
    y = torch.randint(0, num_classes, (B,), generator=gen)
    return x, t, y


@pytest.mark.parametrize("name,want", [("dit-b", 130.5e6), ("dit-l", 458.1e6), ("dit-xl", 675.1e6)])
def test_paper_parameter_counts(name, want):
    """DiT paper Table 4 sizes for the /2 models on a 32x32x4 latent, learned sigma."""
    with torch.device("meta"):
        m = DiT(DiT.preset_config(name, in_channels=4, input_size=32, patch_size=2, learn_sigma=True))
    assert abs(count_parameters(m) - want) / want < 0.01


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_presets_build_on_meta(name):
    with torch.device("meta"):
        m = DiT.from_preset(name)
    c = m.config
    assert (c.in_channels, c.input_size, c.patch_size, c.num_classes) == (16, 16, 1, 1000)
    assert m.y_embedder.embedding_table.num_embeddings == 1001  # + null class


@pytest.mark.parametrize("patch,learn_sigma,pos", [(1, True, "sincos"), (2, False, "learned"), (2, True, "sincos")])
def test_shapes_and_backward(patch, learn_sigma, pos, gen):
    m = make(patch_size=patch, learn_sigma=learn_sigma, pos_embed=pos).train()
    x, t, y = inputs(gen)
    out = m(x, t, y, generator=gen)
    assert out.shape == (3, 8 if learn_sigma else 4, 4, 4)
    out.square().mean().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_zero_init_output_is_exactly_zero(gen):
    torch.manual_seed(0)
    m = DiT(DiTConfig(**TOY)).eval()
    x, t, y = inputs(gen)
    assert torch.equal(m(x, t, y), torch.zeros(3, 8, 4, 4))
    for blk in m.blocks:  # adaLN-Zero: every block starts as the identity
        assert torch.count_nonzero(blk.adaLN_modulation[-1].weight) == 0


def test_sincos_matches_numpy_reference():
    """Second implementation, in NumPy, of the MAE/DiT layout: meshgrid(w, h), first half from grid[0]."""
    D, G = 32, 5

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(G, dtype=np.float32), np.arange(G, dtype=np.float32))
    ref = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    np.testing.assert_allclose(sincos_pos_embed_2d(D, G).numpy(), ref, atol=1e-6)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 7)  # odd dim -> zero pad
    half = 3
    for i, tv in enumerate(t.tolist()):
        for k in range(half):
            w = math.exp(-math.log(10000) * k / half)
            assert emb[i, k].item() == pytest.approx(math.cos(tv * w), abs=1e-4)
            assert emb[i, half + k].item() == pytest.approx(math.sin(tv * w), abs=1e-4)
    assert torch.all(emb[:, -1] == 0)


def test_label_dropout_statistics_and_generator():
    m = make(class_dropout_prob=0.1)
    n = 40000
    mask = m.label_drop_mask(n, torch.Generator().manual_seed(1))
    p = mask.float().mean().item()
    assert abs(p - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    assert torch.equal(mask, m.label_drop_mask(n, torch.Generator().manual_seed(1)))
    assert not torch.equal(mask, m.label_drop_mask(n, torch.Generator().manual_seed(2)))


def test_label_dropout_in_forward(gen):
    m = make(class_dropout_prob=0.5)
    x, t, y = inputs(gen, B=16)
    null = torch.full_like(y, m.null_class)
    drop = torch.zeros(16, dtype=torch.bool)
    drop[::3] = True
    mixed = torch.where(drop, null, y)
    # Explicit mask, any mode: same as feeding the null label.
    torch.testing.assert_close(m(x, t, y, drop_labels=drop), m(x, t, mixed), rtol=0, atol=0)
    # Eval mode: no dropout at all.
    m.eval()
    torch.testing.assert_close(m(x, t, y), m(x, t, y, drop_labels=torch.zeros(16, dtype=torch.bool)), rtol=0, atol=0)
    # Train mode: the mask is the one label_drop_mask draws from the same generator.
    m.train()
    want_mask = m.label_drop_mask(16, torch.Generator().manual_seed(7))
    assert 0 < want_mask.sum() < 16
    out = m(x, t, y, generator=torch.Generator().manual_seed(7))
    no_drop = torch.zeros(16, dtype=torch.bool)
    torch.testing.assert_close(out, m(x, t, torch.where(want_mask, null, y), drop_labels=no_drop), rtol=0, atol=0)


def test_cfg_scale_one_is_the_conditional_model(gen):
    for learn_sigma in (True, False):
        m = make(learn_sigma=learn_sigma)
        x, t, y = inputs(gen)
        assert torch.equal(m.forward_with_cfg(x, t, y, 1.0), m(x, t, y))
        m.train()  # no random label dropout in guided sampling, even in training mode
        assert torch.equal(m.forward_with_cfg(x, t, y, 1.0), m.eval()(x, t, y))


def test_cfg_formula_against_separate_passes(gen):
    m = make(learn_sigma=True)
    x, t, y = inputs(gen)
    cond = m(x, t, y)
    uncond = m(x, t, torch.full_like(y, m.null_class))
    for s in (0.0, 1.5, 4.2):
        g = m.forward_with_cfg(x, t, y, s)
        torch.testing.assert_close(g[:, :4], uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g[:, 4:], cond[:, 4:], atol=1e-5, rtol=1e-5)  # variance from the conditional pass
    m2 = make(learn_sigma=False)
    cond, uncond = m2(x, t, y), m2(x, t, torch.full_like(y, m2.null_class))
    torch.testing.assert_close(m2.forward_with_cfg(x, t, y, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_attention_backends_and_checkpointing_parity(gen):
    m = make()
    x, t, y = inputs(gen)
    ref = m(x, t, y)
    m.set_attn_backend("reference")
    torch.testing.assert_close(m(x, t, y), ref, atol=1e-5, rtol=1e-5)
    assert m.config.attn_backend == "reference"
    if hasattr(torch.nn.attention, "flex_attention"):  # full attention: FlexAttention without a block mask
        m.set_attn_backend("flex")
        with torch.no_grad():  # FlexAttention has no backward on CPU
            torch.testing.assert_close(m(x, t, y), ref, atol=1e-5, rtol=1e-5)
        m.set_attn_backend("reference")
    m.train().set_grad_checkpointing(True)
    drop = torch.zeros(3, dtype=torch.bool)
    out = m(x, t, y, drop_labels=drop)
    out.sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(False)
    m(x, t, y, drop_labels=drop).sum().backward()
    for a, b in zip(g1, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(tmp_path, gen):
    norm = LatentNormalizer([0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 3.0])
    m = make(pos_embed="learned", **norm.config_fields())
    m.save_pretrained(tmp_path / "dit")
    m2 = DiT.from_pretrained(tmp_path / "dit", attn_backend="reference")
    assert m2.config.latent_mean == (0.1, -0.2, 0.3, 0.0) and m2.config.latent_std == (1.0, 2.0, 0.5, 3.0)
    x, t, y = inputs(gen)
    torch.testing.assert_close(m2.eval()(x, t, y), m(x, t, y), atol=1e-5, rtol=1e-5)
    z = torch.randn(2, 4, 4, 4, generator=gen)
    torch.testing.assert_close(m2.normalizer.normalize(z), norm.normalize(z))
    with pytest.raises(ValueError, match="depth"):
        DiT.from_pretrained(tmp_path / "dit", depth=3)


def test_bad_inputs_raise(gen):
    m = make()
    x, t, y = inputs(gen)
    with pytest.raises(ValueError, match="shape"):
        m(x[:, :3], t, y)
    with pytest.raises(ValueError, match="labels"):
        m(x, t, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(input_size=5, patch_size=2)
    with pytest.raises(ValueError, match="channels"):
        DiTConfig(in_channels=4, latent_mean=[0.0] * 3, latent_std=[1.0] * 3)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiT.preset_config("dit-s")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_inference_through_kept_weights_matches_the_plain_linear_path(precision):
    # DiT's linears keep their weights packed (fp32) or cast (autocast) for CPU inference; the
    # reference path is F.linear with the weight as stored (Linear.fast = False)
    from hieratok.nn.linear import Linear

    torch.manual_seed(0)
    m = DiT.from_preset("dit-tiny", in_channels=4, input_size=8, patch_size=2).eval()
    with torch.no_grad():
        for p in m.parameters():  # away from adaLN-Zero's zero output
            p.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([1, 2, 1000])

    def run(fast: bool) -> torch.Tensor:
        for mod in m.modules():
            if isinstance(mod, Linear):
                mod.fast = fast
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return m(x, t, y).float()

    ref, fast = run(False), run(True)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    assert all(dtype in mod._packs for mod in m.modules() if isinstance(mod, Linear))  # the kept path ran
    # qkv, proj, fc1, fc2 and adaLN per block, the final layer's two
    assert sum(isinstance(mod, Linear) for mod in m.modules()) == 5 * len(m.blocks) + 2
    # float32: rounding of a differently blocked gemm; bf16: the same products, possibly rounded to
    # bf16 at a different point in a few layers (2^-8 relative per rounding)
    tol = 1e-5 if precision == "fp32" else 2 ** -5
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol * float(ref.abs().max()))
