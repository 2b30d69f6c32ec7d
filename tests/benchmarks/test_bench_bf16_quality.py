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


def test_seed_matters_compares_the_seed_spread_with_the_bf16_shift():
    def summary(other, same):
        return {"fid_fp32_vs_fp32_other_seed": None if other is None else {"mean": other},
                "fid_fp32_vs_bf16_same_seed": {"mean": same}}

    assert bench.seed_matters(summary(28.3, 0.58)) is True  # the DiT run: noise moves the samples, bf16 barely
    assert bench.seed_matters(summary(0.01, 0.22)) is False  # every seed decodes to the same image
    assert bench.seed_matters(summary(None, 0.22)) is None  # one seed


def test_pm_formats_mean_and_std_with_a_scale():
    assert bench.pm({"mean": 0.0123, "std": 0.0045}, ".1f", 1e3) == "12.3 ± 4.5"


# ------------------------------------------------------------------------------------------------
# The chains' options and commands (built, not run)
# ------------------------------------------------------------------------------------------------

def _overrides(argv):
    return dict(x.split("=", 1) for x in argv if "=" in x)


def test_dit_is_the_default_chain_with_its_old_settings_and_option_names():
    a = bench.parse_args([])
    assert a.generator == "dit" and (a.tok_task, a.tok_preset, a.gen_task, a.gen_preset) == ("hieratok", "tiny", "dit", "dit-tiny")
    assert (a.gen_steps, a.gen_batch, a.gen_lr, a.sample_steps, a.num, a.seeds) == (1000, 64, 1e-3, 50, 128, [0, 1, 2])
    assert a.out == "/tmp/bf16q/run"
    assert bench.parse_args(["--dit-steps", "7", "--dit-batch", "8", "--dit-lr", "0.5"]).gen_steps == 7


def test_har_chain_trains_restok_then_a_har_gpt_on_its_codes(tmp_path):
    a = bench.parse_args(["--generator", "har", "--tok-steps", "30", "--gen-steps", "40"])
    assert a.sample_steps is None and a.num == 256 and a.seeds == [0, 1, 2, 3, 4]

    tok = bench.tokenizer_argv(a, tmp_path / "tok")
    assert tok[:5] == ["train", "--task", "restok", "--preset", "restok-tiny"] and tok[tok.index("--steps") + 1] == "30"
    o = _overrides(tok)
    # restok-tiny is 64 px: crops of photos shrunk to a 128 px short side, as the cache draws them;
    # the ResTok task's 5000 warm-up steps would outlast the run; with the release's init and commitment
    # restok-tiny gives every photo the same codes (BENCHMARKS.md)
    assert o["data.short_side"] == "128" and o["optim.warmup_steps"] == "null"
    assert o["model.init_std"] == "0.08" and o["model.commitment_beta"] == "0"
    assert bench.parse_args(["--generator", "har"]).tok_steps == 2000 and bench.parse_args([]).tok_steps == 200

    assert bench.cache_argv(a, "tokdir", tmp_path / "cache") == [
        "cache-latents", "--checkpoint", "tokdir", "--out", str(tmp_path / "cache"), "--num", "2048"]  # no --ten-crop

    gen = bench.generator_argv(a, tmp_path / "cache", tmp_path / "har")
    assert gen[:7] == ["train", "--task", "ar", "--preset", "gpt-tiny", "--data", str(tmp_path / "cache")]
    o = _overrides(gen)
    assert o["objective.layout"] == "har" and gen[gen.index("--steps") + 1] == "40"
    assert o["optim.lr"] == o["optim.end_lr"] == "0.001"


def test_dit_commands_get_no_har_or_restok_overrides(tmp_path):
    a = bench.parse_args([])
    assert "optim.warmup_steps" not in _overrides(bench.tokenizer_argv(a, tmp_path))
    assert "objective.layout" not in _overrides(bench.generator_argv(a, tmp_path, tmp_path))


def test_quick_leaves_har_without_sampler_steps():
    a = bench.parse_args(["--generator", "har", "--quick"])
    assert a.sample_steps is None and a.gen_steps == bench.QUICK["gen_steps"] and a.num == bench.QUICK["num"]
    assert bench.parse_args(["--quick"]).sample_steps == bench.QUICK["sample_steps"]


@pytest.mark.parametrize("argv, message", [
    (["--generator", "har", "--sample-steps", "10"], "no steps"),
    (["--generator", "har", "--tok-preset", "tiny"], "not a restok preset"),
    (["--tok-preset", "restok-tiny"], "not a hieratok preset"),
    (["--generator", "gan"], "invalid choice"),
])
def test_options_that_do_not_fit_the_chain_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
