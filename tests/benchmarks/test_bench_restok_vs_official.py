"""The parts of benchmarks/bench_restok_vs_official.py that need no checkout of the official code."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_restok_vs_official as bench  # noqa: E402


def test_code_agreement_counts_positions_and_first_differences():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[1, 2, 3, 4], [5, 0, 7, 0]], dtype=torch.int32)  # their sampler returns int32 codes
    out = bench.code_agreement(a, b)
    assert out == {"rate": 0.75, "equal": "6/8", "first_difference": [None, 1]}
    with pytest.raises(ValueError, match="shape"):
        bench.code_agreement(a, b[:, :3])


def test_bf16_status_says_when_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr("hieratok.precision.cpu_flags", lambda: frozenset({"avx2", "fma"}))
    s = bench.bf16_status()
    assert s["emulated"] and not s["native"] and "emulated" in s["note"]
    monkeypatch.setattr("hieratok.precision.cpu_flags", lambda: frozenset({"avx512_bf16"}))
    s = bench.bf16_status()
    assert s["native"] and not s["emulated"] and s["note"] is None


def test_every_precision_names_both_regimes():
    assert set(bench.PRECISION_REGIMES) == {"fp32", "bf16"}
    assert all(set(r) == {"official", "ours", "tokenizer"} for r in bench.PRECISION_REGIMES.values())


def test_gradient_parity_is_relative_to_each_tensors_largest_gradient():
    # binary fractions, so every ratio below is exact in float32
    ref = {"a": torch.tensor([1.0, -4.0]), "b": torch.tensor([2.0 ** -20, 0.0])}
    ours = {"a": torch.tensor([1.0, -3.0]), "b": torch.tensor([2.0 ** -20, 2.0 ** -27])}  # 1/4 and 1/128
    floor = {"a": torch.tensor([1.0, -4.0 + 2.0 ** -20]), "b": ref["b"].clone()}  # 2^-22 and 0
    r = bench.gradient_parity(ref, ours, floor)
    assert r["tensors"] == 2 and r["rel_err_max"] == 0.25 and r["worst"] == {"a": 0.25, "b": 2.0 ** -7}
    assert r["floor_rel_err_max"] == 2.0 ** -22 and r["floor_rel_err_median"] == 0.0
    assert r["rel_err_median"] == 2.0 ** -7  # torch's median: the lower of two values
