"""Inference precision: the context helper's switches, CPU bf16 gating, and bf16 / fp32 reconstructions.

bf16 tolerance, derived: bf16 keeps 8 significant bits, so rounding a value to it has relative
error at most u = 2^-9 (half the spacing 2^-8). Under autocast every matmul / convolution rounds
both of its inputs, so its output carries a relative error of at most 2u = 2^-8 per layer (products
exact, sums in float32). Through a network of L such layers, independent errors add like a random
walk: relative RMS error about sqrt(L) * 2^-8. We assert twice that (sqrt(L) * 2^-7) for the final
reconstruction, the margin covering partly correlated errors and the bf16 rounding of the output
itself; L is counted from the model. Measured on the tiny HieraTok (L = 24): 0.0057, bound 0.038.
"""

import logging
import math

import pytest
import torch

from hieratok import HieraTok
from hieratok.data import EmbeddedPhotos
from hieratok.evaluate import ReconEvalConfig, evaluate_reconstruction
from hieratok.precision import PRECISIONS, exact_fp32, inference_precision, native_on_cpu, resolve_precision


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).eval()


def test_resolve_defaults_and_bad_names():
    assert PRECISIONS == ("fp32", "tf32", "bf16", "fp16")
    assert resolve_precision(None, "cpu") == "fp32" and resolve_precision(None, "cuda") == "tf32"
    with pytest.raises(ValueError, match="one of fp32, tf32, bf16, fp16, got 'half'"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="one of"):
        with inference_precision("fp64", "cpu"):
            pass


def test_cpu_bf16_is_gated_on_native_support(monkeypatch, caplog):
    monkeypatch.setattr("hieratok.precision.cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level(logging.WARNING, logger="hieratok.precision"):
        assert resolve_precision("bf16", "cpu") == "bf16"  # allowed, with a warning
    assert "without native bf16" in caplog.text and "AVX512_BF16 / AMX_BF16" in caplog.text
    assert torch.backends.cpu.get_cpu_capability() in caplog.text
    caplog.clear()
    monkeypatch.setattr("hieratok.precision.cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with caplog.at_level(logging.WARNING, logger="hieratok.precision"):
        resolve_precision("bf16", "cpu")
        assert not caplog.text
        resolve_precision("tf32", "cpu")
    assert "runs as fp32" in caplog.text


def test_native_on_cpu_follows_the_flags():
    assert native_on_cpu("bf16", frozenset({"avx2", "fma"})) is False
    assert native_on_cpu("bf16", frozenset({"amx_bf16"})) and native_on_cpu("bf16", frozenset({"avx512_bf16"}))
    assert native_on_cpu("fp16", frozenset({"avx512_bf16"})) is False
    assert native_on_cpu("fp16", frozenset({"avx512_fp16"})) is True
    assert native_on_cpu("fp32", frozenset()) is None and native_on_cpu("tf32", frozenset({"amx_bf16"})) is None


def test_tf32_switches_are_set_inside_and_restored():
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    with inference_precision(None, "cuda"):  # the CUDA default: TF32 (the switches exist on CPU builds too)
        assert flags() == (True, True)
        with exact_fp32("cuda"):  # Inception inside a TF32 region: exact float32
            assert flags() == (False, False) and not torch.is_autocast_enabled("cuda")
        assert flags() == (True, True)
    with inference_precision("fp32", "cuda"):
        assert flags() == (False, False)
    assert flags() == before
    with inference_precision("fp32", "cpu"), inference_precision("tf32", "cpu"):
        assert flags() == before and not torch.is_autocast_enabled("cpu")  # nothing to switch on a CPU


def test_autocast_on_the_model_only_and_exact_fp32_inside():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with inference_precision("bf16", "cpu"):
        assert lin(x).dtype == torch.bfloat16
        with exact_fp32("cpu"):
            assert lin(x).dtype == torch.float32
    with inference_precision("fp16", "cpu"):
        assert lin(x).dtype == torch.float16
    assert lin(x).dtype == torch.float32


def test_bf16_reconstruction_within_the_derived_bound(tok):
    x = torch.stack([EmbeddedPhotos("heldout", 64)[i][0] for i in range(4)])
    with torch.no_grad():
        ref = tok.reconstruct(x)[0][-1]
        with inference_precision("bf16", "cpu"):
            low = tok.reconstruct(x)[0][-1]
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16  # autocast did run
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in tok.modules())
    rel = ((low.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    bound = math.sqrt(layers) * 2.0**-7
    assert 0 < rel < bound, (rel, bound, layers)


def test_eval_recon_fp32_is_the_default_bit_for_bit_and_bf16_close(tok):
    def run(precision):
        cfg = ReconEvalConfig(num=4, batch_size=4, perceptual="none", fid=False, progress=False, keep_images=4,
                              precision=precision)
        return evaluate_reconstruction(tok, cfg)

    default, fp32, bf16 = run(None), run("fp32"), run("bf16")
    assert default["protocol"]["precision"] == fp32["protocol"]["precision"] == "fp32"
    assert bf16["protocol"]["precision"] == "bf16"
    for k in ("psnr", "ssim", "color_error", "psnr_per_scale"):
        assert default[k] == fp32[k]
    for a, b in zip(default["samples"]["pyramids"], fp32["samples"]["pyramids"]):
        assert torch.equal(a, b)
    # PSNR of bf16 reconstructions vs fp32 ones: the derived relative bound, with the signal RMS
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in tok.modules())
    a, b = default["samples"]["pyramids"][-1], bf16["samples"]["pyramids"][-1]
    err = (a - b).pow(2).mean().sqrt()
    assert err <= math.sqrt(layers) * 2.0**-7 * a.pow(2).mean().sqrt()
    assert 20 * math.log10(2 / err) > 40  # peak-to-peak 2; measured ~62 dB
