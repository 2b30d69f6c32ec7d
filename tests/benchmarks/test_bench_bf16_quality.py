"""The pure summaries of benchmarks/bench_bf16_quality.py (no training, no Inception)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_bf16_quality as bench  # noqa: E402


def test_mean_std_uses_the_sample_std_and_zero_for_one_value():
    assert bench.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert bench.mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError):
        bench.mean_std([])


def test_paired_summary_pairs_by_seed():
    s = bench.paired_summary([10.0, 20.0, 30.0], [11.0, 22.0, 33.0])
    assert s["diffs"] == [1.0, 2.0, 3.0]
    assert s["diff"] == {"mean": 2.0, "std": 1.0, "n": 3}
    assert s["fp32"]["mean"] == 20.0 and s["bf16"]["mean"] == 22.0
    # the unpaired spread (10 on each side) would hide what pairing shows: every seed got worse
    assert s["fp32"]["std"] == 10.0 and s["direction"] == "bf16 worse"
    with pytest.raises(ValueError, match="same"):
        bench.paired_summary([1.0, 2.0], [1.0])


@pytest.mark.parametrize("diffs, want", [
    ([1.0, 2.0, 3.0], "bf16 worse"),
    ([-1.0, -2.0, -3.0], "bf16 better"),
    ([1.0, -1.0, 3.0], "no direction"),  # signs disagree
    ([0.1, 0.1, 5.0], "no direction"),  # same sign, but the mean (1.73) does not exceed the std (2.83)
    ([2.0], "no direction"),  # one seed has no spread to compare with
])
def test_direction_is_claimed_only_beyond_the_seed_spread(diffs, want):
    assert bench.direction(diffs) == want


def test_direction_of_a_higher_is_better_metric_flips():
    assert bench.direction([1.0, 2.0, 3.0], higher_is_worse=False) == "bf16 better"


def test_pixel_difference_compares_image_i_with_image_i():
    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[1, 0, 0, 0] = 250  # 0 vs 250: no uint8 wrap-around
    d = bench.pixel_difference(a, b)
    assert d["mean_abs"] == pytest.approx(250 / 24)
    assert d["max_abs"] == 250 and d["identical_images"] == 1 and d["num"] == 2
    assert d["per_image_max"] == pytest.approx(250 / 12) and d["equal_values"] == pytest.approx(23 / 24)
    with pytest.raises(ValueError):
        bench.pixel_difference(a, b[:1])
    with pytest.raises(ValueError):
        bench.pixel_difference(a, b.astype(np.int16))


def test_pm_formats_mean_and_std_with_a_scale():
    assert bench.pm({"mean": 0.0123, "std": 0.0045}, ".1f", 1e3) == "12.3 ± 4.5"
