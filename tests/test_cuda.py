"""What only a CUDA device can check: the GPU fast paths against their reference paths, and CUDA
results against CPU ones. CPU CI skips this module; ``bash benchmarks/gpu_check.sh`` runs it.

FlexAttention's backward and compiled kernels, TF32 and bf16 autocast exist on CUDA only. The
float32 checks turn TF32 off: with it, matmul and conv inputs keep 10 mantissa bits (relative
errors near 1e-3), without it float32 results of differently ordered sums differ near 1e-6. The
bound 1e-4 separates the two. bf16 operands keep 8 bits: 3e-2 allows a few roundings of that.
"""

import pytest
import torch

from hieratok import HieraTok
from hieratok.checkpoint import latest_checkpoint
from hieratok.generators.autoregressive import har_layout, sample_layout
from hieratok.generators.dit import DiT
from hieratok.generators.llamagen import GPT
from hieratok.nn.attention import Attention
from hieratok.nn.masks import MaskSpec
from hieratok.train import Trainer, load_config

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
FP32, BF16 = 1e-4, 3e-2
PAPER_SCALES = (1, 2, 4, 8, 16)  # 341 tokens: FlexAttention's 128-blocks end inside a scale


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error; absolute where the reference is all zero (e.g. the unused log-variance
    rows' gradients in eval mode)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / (b.norm() if b.any() else 1.0)).item()


def _attention_run(attn: Attention, x: torch.Tensor, mask: MaskSpec) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    attn.zero_grad(set_to_none=True)
    y = attn(x, mask)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device)
    (y.float() * w).sum().backward()
    return (y, x.grad, *(p.grad for p in attn.parameters()))


@pytest.mark.parametrize("mode", ["scale_causal", "scale_independent", "full"])
def test_flex_and_sdpa_match_float64_reference_forward_and_backward(mode):
    """The decoder's attention at the paper's 341 tokens: output, input and weight gradients of
    the flex and sdpa backends on CUDA against the reference backend in float64."""
    torch.manual_seed(0)
    attn = Attention(128, 2).cuda()  # head dim 64, the paper's
    x = torch.randn(3, 341, 128, device="cuda")
    mask = MaskSpec.for_scales(mode, PAPER_SCALES)
    attn.double().backend = "reference"
    ref = _attention_run(attn, x.double(), mask)
    attn.float()
    for backend in ("sdpa", "flex"):
        attn.backend = backend
        for a, b in zip(_attention_run(attn, x, mask), ref):
            assert rel(a, b) < FP32, (backend, rel(a, b))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for a, b in zip(_attention_run(attn, x, mask), ref):
                assert rel(a, b) < BF16, (backend, "bf16", rel(a, b))


@pytest.mark.parametrize("preset", ["tiny", "hieratok-f16d16"])
def test_tokenizer_on_cuda_matches_cpu_for_every_backend(preset):
    torch.manual_seed(0)
    m = HieraTok.from_preset(preset).eval()
    size = m.config.image_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = m.encode(x).mode()
        ref = m.decode(z, all_scales=True)
        m.cuda()
        for backend in ("sdpa", "flex", "reference"):
            m.set_attn_backend(backend)
            zc = m.encode(x.cuda()).mode()
            assert rel(zc, z) < FP32, backend
            for a, b in zip(m.decode(z.cuda(), all_scales=True), ref):
                assert rel(a, b) < FP32, backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.decode(m.encode(x.cuda()).mode(), all_scales=True)
    for a, b in zip(out, ref):
        assert rel(a, b) < BF16


def _grads(net: torch.nn.Module, model: HieraTok, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = net(x)
    loss = sum((r - torch.nn.functional.interpolate(x, size=r.shape[-2:], mode="area")).abs().mean()
               for r in out["reconstructions"])
    loss.backward()
    return [loss] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_training_gradients_of_flex_and_compiled_model_match_eager_sdpa():
    """One training step's loss and every parameter gradient: the flex backend and the
    torch.compile'd model against eager sdpa (eval mode: no sampled noise or drop-path draws)."""
    torch.manual_seed(0)
    m = HieraTok.from_preset("tiny").cuda().eval()
    x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    ref = _grads(m, m, x)
    assert len(ref) == 1 + sum(1 for p in m.parameters() if p.requires_grad)
    m.set_attn_backend("flex")
    for a, b in zip(_grads(m, m, x), ref):
        assert rel(a, b) < FP32
    m.set_attn_backend("sdpa")
    for a, b in zip(_grads(torch.compile(m), m, x), ref):
        assert rel(a, b) < FP32


def test_har_sampling_on_cuda_draws_the_cpu_codes():
    """A seeded CPU generator drives the draws on either device; logits agree to ~1e-6, so a
    code differs only where a uniform draw falls that close to a class boundary."""
    torch.manual_seed(0)
    m = GPT(GPT.preset_config("gpt-tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    lay, labels = har_layout(16, 2), torch.tensor([3, 10, 7, 0])
    kw = dict(cfg_scale=2.0, top_p=0.95)
    cpu = sample_layout(m, labels, lay, **kw, generator=torch.Generator().manual_seed(0)).codes
    m.cuda()
    for backend in ("sdpa", "flex"):
        m.set_attn_backend(backend)
        got = sample_layout(m, labels.cuda(), lay, **kw, generator=torch.Generator().manual_seed(0)).codes
        assert got.device.type == "cuda"
        assert (got.cpu() == cpu).float().mean() >= 0.95, backend


def test_dit_on_cuda_matches_cpu():
    torch.manual_seed(0)
    m = DiT.from_preset("dit-tiny", in_channels=4, input_size=8, patch_size=2).eval()
    with torch.no_grad():  # adaLN and the output layer start at zero; give every weight some signal
        for p in m.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        ref = m.forward_with_cfg(x, t, y, 4.0)
        got = m.cuda().forward_with_cfg(x.cuda(), t.cuda(), y.cuda(), 4.0)
        assert rel(got, ref) < FP32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert rel(m.forward_with_cfg(x.cuda(), t.cuda(), y.cuda(), 4.0), ref) < BF16


def test_trainer_on_cuda_trains_in_bf16_and_saves_a_checkpoint_cpu_can_load(tmp_path):
    cfg = load_config(overrides={"preset": "tiny", "steps": 4, "ckpt_every": 4, "batch_size": 8, "progress": False,
                                 "tensorboard": False, "image_every": 0, "log_every": 1, "loss.perceptual": 0.0,
                                 "data.samples_per_epoch": 64, "out_dir": str(tmp_path / "run")})
    t = Trainer(cfg, device="cuda")
    assert t.bf16 and next(t.raw["model"].parameters()).device.type == "cuda"
    hist = t.fit()
    assert len(hist) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    loaded = HieraTok.from_pretrained(latest_checkpoint(tmp_path / "run"))
    for (name, a), b in zip(t.raw["model"].state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.cpu(), b), name
