import pytest
import torch

from hieratok.nn.attention import Attention, attention, attention_reference
from hieratok.nn.masks import MaskSpec
from hieratok.nn.transformer import Transformer, set_attention_backend

SCALES = (1, 2, 4, 8)  # 85 tokens


def _qkv(gen, L=85, B=2, H=3, K=16, dtype=torch.float32):
    return [torch.randn(B, H, L, K, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("mode", ["scale_causal", "scale_independent", "full"])
def test_reference_matches_float64_loop(gen, mode):
    q, k, v = _qkv(gen, dtype=torch.float64)
    m = MaskSpec.for_scales(mode, SCALES).dense()
    out = attention_reference(q, k, v, m)
    # independent per-query loop over the allowed keys only
    for i in [0, 3, 20, 84]:
        keys = m[i].nonzero().squeeze(1)
        w = torch.softmax((q[:, :, i:i + 1] @ k[:, :, keys].transpose(-2, -1)) / 4.0, dim=-1)
        torch.testing.assert_close(out[:, :, i:i + 1], w @ v[:, :, keys])


@pytest.mark.parametrize("mode", ["scale_causal", "scale_independent", "full"])
def test_sdpa_matches_reference(gen, mode):
    q, k, v = _qkv(gen)
    m = MaskSpec.for_scales(mode, SCALES).dense()
    ref = attention_reference(q.double(), k.double(), v.double(), m)
    out = attention(q, k, v, m if mode != "full" else None, "sdpa")
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mode", ["scale_causal", "scale_independent"])
def test_flex_matches_reference(gen, mode):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _qkv(gen)
    L = q.shape[2]
    bm = flex.create_block_mask(MaskSpec.for_scales(mode, SCALES).mask_mod(), None, None, L, L, device="cpu")
    out = attention(q, k, v, bm, "flex")  # eager FlexAttention on CPU: slow but exact
    ref = attention_reference(q.double(), k.double(), v.double(), MaskSpec.for_scales(mode, SCALES).dense())
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_module_backends_agree_forward_and_backward(gen):
    torch.manual_seed(0)
    attn = Attention(48, 3)
    x = torch.randn(2, 85, 48, generator=gen)
    m = MaskSpec.for_scales("scale_causal", SCALES)
    outs, grads = [], []
    for backend in ["reference", "sdpa"]:
        attn.backend = backend
        xi = x.clone().requires_grad_(True)
        y = attn(xi, m)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_unknown_backend(gen):
    q, k, v = _qkv(gen)
    with pytest.raises(ValueError, match="attention backend"):
        attention(q, k, v, None, "xformers")


def test_grad_checkpointing_same_gradients(gen):
    torch.manual_seed(0)
    net = Transformer(depth=3, dim=32, num_heads=4, drop_path=0.2)
    net.train()
    x = torch.randn(2, 21, 32, generator=gen)
    m = MaskSpec.for_scales("scale_causal", (1, 2, 4))
    calls, attn_forward = [], net.blocks[0].attn.forward
    net.blocks[0].attn.forward = lambda *a, **k: calls.append(1) or attn_forward(*a, **k)
    res, runs = [], []
    for ckpt in (False, True):
        net.grad_checkpointing = ckpt
        net.zero_grad()
        calls.clear()
        torch.manual_seed(123)  # same drop-path draws
        net(x, m).square().mean().backward()
        res.append([p.grad.clone() for p in net.parameters()])
        runs.append(len(calls))
    assert runs == [1, 2]  # checkpointing really recomputes the block in the backward pass
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)


def test_per_sample_masks_bypass_segmentation(gen):
    net = Transformer(depth=1, dim=16, num_heads=2).eval()
    x = torch.randn(2, 7, 16, generator=gen)
    m4 = torch.rand(2, 1, 7, 7, generator=gen) > 0.3
    m4 |= torch.eye(7, dtype=torch.bool)
    with torch.no_grad():
        out = net(x, m4)  # a (B, 1, L, L) mask: one mask per sample
        for b in range(2):  # each sample alone with its own 2-d mask (which is segmented)
            torch.testing.assert_close(out[b:b + 1], net(x[b:b + 1], m4[b, 0]), atol=1e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="takes a BlockMask"):
        set_attention_backend(net, "flex")
        net(x, m4[0, 0])
