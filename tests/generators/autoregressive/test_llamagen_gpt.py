"""The LlamaGen GPT: sizes, building blocks against closed forms, backends, KV cache, save/load."""

import math

import pytest
import torch

from hieratok.generators.llamagen import GPT, GPTConfig, check_ids
from hieratok.nn.mlp import swiglu_hidden_dim
from hieratok.nn.norm import RMSNorm
from hieratok.nn.rope import apply_rope, rope_table


def _tiny(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPT.preset_config("gpt-tiny", **kw)).eval()
    with torch.no_grad():  # the head is zero-initialised; give every weight some signal
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _count(cfg: GPTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())


def test_gpt_l_is_the_released_326m_generator():
    n = _count(GPT.preset_config("gpt-l"))
    assert abs(n - 326e6) / 326e6 < 0.03, n
    # closed form: per layer qkv + proj + 3 SwiGLU matrices + 2 norms, plus embeddings and head
    D, F, V = 1024, 2816, 8192
    per_layer = 4 * D * D + 3 * D * F + 2 * D
    assert n == 24 * per_layer + D + (1001 + V + 127) * D + V * D


def test_swiglu_width_rule():
    assert swiglu_hidden_dim(1024, 256) == 2816  # LlamaGen GPT-L
    assert swiglu_hidden_dim(768, 256) == 2048  # GPT-B
    assert swiglu_hidden_dim(4096, 256) == 11008  # the LLaMA-7B width follows the same rule


def test_presets_build_and_bad_values():
    assert {"gpt-b", "gpt-l", "gpt-tiny"} <= set(GPT.preset_names())
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPT.preset_config("gpt-m")
    with pytest.raises(ValueError, match="heads"):
        GPTConfig(dim=100, num_heads=3)
    with pytest.raises(ValueError, match="attn_backend"):
        GPTConfig(attn_backend="flash")


def test_rmsnorm_closed_form():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    n = RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        n.weight.uniform_(0.5, 2)
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref)


def test_rope_is_a_rotation_that_depends_on_offsets_only():
    K = 8
    q, k = torch.randn(1, 1, 1, K), torch.randn(1, 1, 1, K)

    def at(x, pos):
        return apply_rope(x, rope_table(torch.tensor([pos]), [K], 10000.0, dtype=torch.float32))

    assert at(q, 7).norm() == pytest.approx(q.norm().item(), rel=1e-5)
    d1 = (at(q, 9) * at(k, 4)).sum()
    d2 = (at(q, 105) * at(k, 100)).sum()
    assert d1.item() == pytest.approx(d2.item(), rel=1e-4, abs=1e-5)
    # pair 0 turns by exactly `pos` radians (frequency 1): closed form
    r = at(torch.tensor([1.0, 0.0] + [0.0] * (K - 2)).view(1, 1, 1, K), 2)
    assert r[..., 0].item() == pytest.approx(math.cos(2), abs=1e-6)
    assert r[..., 1].item() == pytest.approx(math.sin(2), abs=1e-6)


def test_sdpa_and_reference_backends_agree():
    m = _tiny()
    tokens = torch.randint(0, 64 + 127, (2, 20))
    labels = torch.tensor([3, 10])
    mask = torch.rand(21, 21) < 0.5
    mask |= torch.eye(21, dtype=torch.bool)
    a = m(tokens, labels, mask=mask)
    m.set_attn_backend("reference")
    b = m(tokens, labels, mask=mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    """Recomputing blocks in backward changes memory, not results (the same dropout masks: the
    recomputation replays the RNG state)."""
    m = _tiny(class_dropout=0.0).train()
    tokens = torch.randint(0, 64 + 127, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 10])
    grads = []
    for on in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(on)
        torch.manual_seed(1)
        m(tokens, labels).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert m.grad_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_kv_cache_in_uneven_chunks_equals_full_forward():
    """Decoding with a cache in steps of 1, 3, 1, 5, ... tokens equals one masked forward pass."""
    m = _tiny()
    B, L = 2, 24
    tokens = torch.randint(0, 64, (B, L - 1))
    labels = torch.tensor([1, 2])
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    mask[5:9, 5:9] = True  # a bidirectional group in the middle
    full = m(tokens, labels, mask=mask)
    cache = m.new_cache(B, L)
    got = [m(None, labels, mask=mask[:1, :1], cache=cache)]
    bounds = [1, 2, 5, 9, 10, 15, 24]
    for s, e in zip(bounds, bounds[1:]):
        got.append(m(tokens[:, s - 1:e - 1], mask=mask[s:e, :e], cache=cache))
    assert cache.length == L
    torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        m(tokens[:, :1], mask=torch.ones(1, L + 1, dtype=torch.bool), cache=cache)


def test_placeholder_ids_use_their_own_table_and_bad_ids_are_rejected():
    m = _tiny()
    V = m.config.vocab_size
    e = m.embed_tokens(torch.tensor([[0, V - 1, V, V + 5]]))
    torch.testing.assert_close(e[0, 1], m.tok_embed.weight[V - 1])
    torch.testing.assert_close(e[0, 3], m.placeholder_embed.weight[5])
    with pytest.raises(ValueError, match="token ids"):
        m.embed_tokens(torch.tensor([[V + 127]]))


def test_bad_labels_are_clear_errors():
    m = _tiny()
    C = m.config.num_classes
    tok = torch.zeros(2, 3, dtype=torch.long)
    assert m(tok, torch.tensor([0, C])).shape == (2, 4, m.config.vocab_size)  # C: the null class
    for labels, match in [(torch.tensor([0, C + 1]), r"\[0, %d\)" % (C + 1)), (torch.tensor([-1, 0]), "lie in"),
                          (torch.tensor([0.0, 1.0]), "integer"), (torch.tensor([True, False]), "integer"),
                          (torch.tensor([0, 1, 2]), r"\(B,\)"), (torch.zeros(2, 1, dtype=torch.long), r"\(B,\)")]:
        with pytest.raises(ValueError, match=match):
            m(tok, labels)


def test_id_checks_queue_on_accelerators_instead_of_syncing():
    # CPU: eager one-line errors. Elsewhere the check is an async device assert, so a training
    # step reads no values back: on the meta device (no values at all) an eager check would fail.
    check_ids(torch.tensor([0, 5]), 6, "codes")
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 5\), got \[0, 5\]"):
        check_ids(torch.tensor([0, 5]), 5, "codes")
    with pytest.raises(ValueError, match=r"got \[-1, 0\]"):
        check_ids(torch.tensor([-1, 0]), 5, "codes")
    check_ids(torch.empty(2, 3, dtype=torch.long, device="meta"), 5, "codes")


def test_class_dropout_uses_the_generator():
    m = _tiny(class_dropout=0.5)
    labels = torch.arange(10).repeat(20)
    a = m.drop_labels(labels, torch.Generator().manual_seed(3))
    b = m.drop_labels(labels, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    dropped = (a == m.null_class).float().mean().item()
    assert 0.35 < dropped < 0.65
    assert torch.equal(a[a != m.null_class], labels[a != m.null_class])


def test_save_and_load_roundtrip(tmp_path):
    m = _tiny()
    m.save_pretrained(tmp_path)
    m2 = GPT.from_pretrained(tmp_path, attn_backend="reference").eval()
    tokens, labels = torch.randint(0, 64, (1, 9)), torch.tensor([4])
    torch.testing.assert_close(m2(tokens, labels), m(tokens, labels), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="different architecture"):
        GPT.from_pretrained(tmp_path, dim=128)


def test_backward_reaches_every_parameter():
    m = _tiny().train()
    loss = m(torch.randint(0, 64 + 127, (2, 9)), torch.tensor([1, 2])).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_gpt_built_and_run_inside_inference_mode():
    """Inference tensors have no version counter: the prepacked-weight path must not need one."""
    from hieratok.generators.autoregressive import har_layout, sample_layout

    ref_model = _tiny(num_classes=3)
    labels = torch.tensor([0, 2])
    layout = har_layout(16, 4)
    with torch.no_grad():
        ref = sample_layout(ref_model, labels, layout, cfg_scale=2.0, generator=torch.Generator().manual_seed(0)).codes
    with torch.inference_mode():
        m = GPT(ref_model.config).eval()
        m.load_state_dict(ref_model.state_dict())
        codes = sample_layout(m, labels, layout, cfg_scale=2.0, generator=torch.Generator().manual_seed(0)).codes
    assert torch.equal(codes, ref)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_backend_runs_the_har_spec_in_training_and_cached_steps():
    """One Attention serves every backend: FlexAttention over a HAR layout's group spec (whole
    sequence, and each cached group step) equals the reference backend."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from hieratok.generators.autoregressive import har_layout, training_batch

    m = _tiny()
    lay = har_layout(16, 2)
    codes = torch.randint(0, m.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 10])
    inputs, _ = training_batch(codes, lay, m.config.vocab_size)
    outs = {}
    with torch.no_grad():
        for backend in ("reference", "flex"):
            m.set_attn_backend(backend)
            full = m(inputs, labels, mask=lay.mask)
            cache = m.new_cache(2, 16)
            steps = [m(None if s == 0 else inputs[:, s - 1:e - 1], labels if s == 0 else None, mask=lay.mask,
                       cache=cache) for s, e in lay.group_bounds()]
            outs[backend] = (full, torch.cat(steps, 1))
    m.set_attn_backend("sdpa")
    for a, b in zip(outs["reference"], outs["flex"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["flex"][1], outs["flex"][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block end"):  # a step must end where a group ends
        m(inputs[:, :2], labels, mask=lay.mask, cache=m.new_cache(2, 16))
