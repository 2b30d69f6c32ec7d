"""The ablation's statistics and variant parsing (the end-to-end runs are in test_demo_reconstruct)."""

import numpy as np
import pytest
from scipy import stats

from hieratok.ablation import VARIANTS, AblationConfig, conclusions, paired_comparison, parse_variant, summarize


def test_paired_comparison_is_scipys_paired_t_test():
    base, other = [20.0, 21.0, 22.5, 19.0], [20.9, 21.4, 23.8, 19.6]
    c = paired_comparison(base, other, higher_is_better=True)
    ref = stats.ttest_rel(other, base)
    assert c["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert c["mean"] == pytest.approx(np.mean(np.subtract(other, base)))
    assert c["std"] == pytest.approx(np.std(np.subtract(other, base), ddof=1))
    assert c["verdict"] == "better" and c["all_seeds_agree"]
    assert paired_comparison(base, other, higher_is_better=False)["verdict"] == "worse"
    noisy = paired_comparison([1.0, 2.0, 3.0], [1.5, 1.5, 3.2], higher_is_better=True)
    assert noisy["verdict"] == "within seed spread" and not noisy["all_seeds_agree"]
    assert paired_comparison([1.0], [2.0], True)["verdict"] == "one seed"


def test_variants_and_custom_overrides():
    assert parse_variant("single", "tiny").preset == "tiny-single"
    assert parse_variant("interp", "tiny").overrides == {"model.downsample": "interp"}
    assert parse_variant("fewer-scales", "tiny").overrides == {"model.scales": [1, 2, 8]}
    assert parse_variant("fewer-scales", "hieratok-f16d16").overrides == {"model.scales": [1, 2, 4, 16]}
    v = parse_variant("mine:model.downsample=conv-prenorm,loss.kl=0.001", "tiny")
    assert (v.name, v.preset, v.overrides) == ("mine", "tiny", {"model.downsample": "conv-prenorm", "loss.kl": 0.001})
    for bad, match in (("nope", "unknown variant"), ("x:novalue", "not key=value"), ("../x:a=1", "plain word")):
        with pytest.raises(ValueError, match=match):
            parse_variant(bad, "tiny")
    assert {"single", "conv", "conv-residual", "conv-prenorm", "interp", "full", "independent"} <= set(VARIANTS)
    with pytest.raises(ValueError, match="baseline 'single' is not among"):
        AblationConfig(variants=("conv", "interp"))


def test_summary_and_conclusions_claim_only_what_the_seeds_support():
    def run(psnr, ssim):
        return {"psnr": psnr, "ssim": ssim, "perceptual_name": "none", "psnr_per_scale": {"64": psnr}}

    results = {"single": {0: run(20.0, 0.50), 1: run(21.0, 0.52), 2: run(22.0, 0.51)},
               "multi": {0: run(21.0, 0.49), 1: run(22.1, 0.53), 2: run(22.9, 0.50)}}
    s = summarize(results, "single")
    assert s["variants"]["multi"]["psnr"]["mean"] == pytest.approx(22.0)
    assert s["variants"]["multi"]["psnr"]["std"] == pytest.approx(np.std([21.0, 22.1, 22.9], ddof=1))
    assert s["vs_baseline"]["multi"]["psnr"]["verdict"] == "better"
    assert s["vs_baseline"]["multi"]["ssim"]["verdict"] == "within seed spread"
    (line,) = conclusions(s, "single")
    assert "better on PSNR (dB)" in line and "not distinguishable from the seed spread on SSIM" in line
