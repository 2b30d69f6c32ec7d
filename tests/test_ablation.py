"""The ablation's statistics and variant parsing (the end-to-end runs are in test_demo_reconstruct)."""

import logging
import math
import time

import numpy as np
import pytest
import torch
from scipy import stats

from hieratok import HieraTok
from hieratok.ablation import (
    VARIANTS,
    AblationConfig,
    _evaluate,
    conclusions,
    paired_comparison,
    parse_variant,
    summarize,
)


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


def test_choose_threads_gives_up_a_stalled_count_after_one_step(monkeypatch):
    import torch

    from hieratok.ablation import choose_threads

    calls = []

    def step():  # two threads stall (a neighbour holds a core), one thread runs normally
        calls.append(torch.get_num_threads())
        time.sleep(0.005 if torch.get_num_threads() == 1 else 0.5)

    before = torch.get_num_threads()
    n, timings = choose_threads(step, (1, 2), repeats=3)
    assert n == 1 and calls == [1, 1, 1, 2] and timings[2] > 2 * timings[1]
    assert torch.get_num_threads() == before


def test_load_notes_name_what_the_machine_did():
    from hieratok.ablation import load_notes

    idle = {"thread_timings_s": {1: 0.8, 2: 0.5}, "thread_switches": [], "budget_s": 600, "seconds": 590}
    results = {"multi": {0: {"train_seconds": 60.0, "train_seconds_planned": 55.0}}}
    assert load_notes(idle, results) == []
    busy = {"thread_timings_s": {"1": 0.9, "2": 25.0}, "thread_switches": [(1, 2), (2, 1)], "budget_s": 600,
            "seconds": 800}
    results["single"] = {1: {"train_seconds": 200.0, "train_seconds_planned": 50.0}}
    notes = " ".join(load_notes(busy, results))
    assert "2 threads took 25.00 s per step against 0.90 s for 1" in notes
    assert "1 -> 2, 2 -> 1" in notes and "4.0x slower than calibrated (single, seed 1)" in notes
    assert "13.3 min against a budget of 10.0 min" in notes


def test_schedule_of_runs_on_several_processes():
    from hieratok.ablation import AblationConfig, Variant, _job_order, _makespan, _plan_workers, _steps_that_fit

    assert _makespan([3.0, 2.0, 2.0, 1.0], 1) == 8.0
    assert _makespan([3.0, 2.0, 2.0, 1.0], 2) == 4.0  # 3+1 | 2+2
    assert _makespan([1.0, 1.0, 3.0], 2) == 4.0  # taken in order: 1+3 | 1
    # a job left alone runs faster: 4 | 2+1 ends at 3, then the first job's last second at 2x
    assert _makespan([4.0, 2.0, 1.0], 2, alone=[2.0, 1.0, 1.0]) == 3.5
    assert _makespan([4.0, 2.0, 2.0], 2, alone=[2.0, 1.0, 1.0]) == 4.0  # never alone
    assert _makespan([1.0, 1.0, 3.0], 2, alone=[1.0, 1.0, 3.0]) == 2.0  # alone from 1 s: 3 s at 3x
    assert _makespan([3.0, 2.0], 1, alone=[2.0, 2.0]) == 5.0  # one worker: nothing to take
    m, s = Variant("multi", "tiny"), Variant("single", "tiny-single")
    c = AblationConfig(seeds=3)
    per = {"multi": 2.0, "single": 1.0}
    # one worker: seed by seed; several: the slow variant's runs first
    assert _job_order(c, [s, m], per, 1) == [(s, 0), (m, 0), (s, 1), (m, 1), (s, 2), (m, 2)]
    # several: seed 0 of every variant first (the runs that check the plan), then the slow variant's runs first
    assert _job_order(c, [s, m], per, 2) == [(m, 0), (s, 0), (m, 1), (m, 2), (s, 1), (s, 2)]
    # 2 workers, multi jobs of 2n + e s and single jobs of n + e s: worker 1 takes multi 0, multi 2 and
    # single 2 (5n + 3e), worker 2 single 0, multi 1 and single 1 (4n + 3e)
    jobs, e = _job_order(c, [s, m], per, 2), 5.0
    for n in (10, 37, 100):
        span = _makespan([n * per[v.name] + e for v, _ in jobs], 2)
        assert span == 5 * n + 3 * e
        assert _steps_that_fit(span, jobs, per, e, 2) == n
        assert _steps_that_fit(span - 1e-6, jobs, per, e, 2) == n - 1
    assert _steps_that_fit(100.0, [(m, 0)], per, 0.0, 1) == 50
    # the last single-scale run alone at 1.5x: its steps past the others' end count 2/3
    for n in (10, 37, 100):
        span = _makespan([n * per[v.name] + e for v, _ in jobs], 2, [1.5 if v is s else 1.0 for v, _ in jobs])
        assert _steps_that_fit(span, jobs, per, e, 2, {"single": 1.5}) == n
        assert span < 5 * n + 3 * e
    assert _plan_workers(AblationConfig(seeds=2, workers=1, threads=3)) == (1, 3)
    assert _plan_workers(AblationConfig(seeds=2, workers=2, threads=1)) == (2, 1)
    with pytest.raises(ValueError, match="workers and threads must be >= 1"):
        AblationConfig(workers=0)


@pytest.mark.parametrize("two_thread_s, expected", [(0.3, 2), (5.0, 1)])
def test_a_run_left_alone_takes_the_idle_core_only_if_that_measures_faster(two_thread_s, expected):
    from types import SimpleNamespace

    from hieratok.ablation import _CoreShare

    runs, set_to = SimpleNamespace(value=2), []
    share = _CoreShare(runs, 2, set_threads=set_to.append)
    share.new_workload()
    seconds = {1: 0.5, 2: two_thread_s}  # 2 threads: faster (idle machine) or stalled (a neighbour holds a core)
    for _ in range(4):  # beside another run: one thread
        share.apply()
        share.step_done(seconds[share.current])
    assert set_to == [1] and share.current == 1
    runs.value = 1  # the neighbour ended: probe two threads against one thread's 0.5 s
    used = []
    for _ in range(6):
        share.apply()
        used.append(share.current)
        share.step_done(seconds[share.current])
    # a faster count is measured for 3 steps and kept; a stalled one is dropped after its first step
    assert used == ([2] * 6 if expected == 2 else [2, 1, 1, 1, 1, 1])
    assert set_to[-1] == expected
    runs.value = 2  # another run started: back to one thread
    share.apply()
    assert share.current == 1 and set_to[-1] == 1


def test_inception_cache_reuses_features_image_by_image_and_the_eval_estimate():
    import torch

    from hieratok.ablation import AblationConfig, _CachedInception, _eval_estimate_s

    class Inner(torch.nn.Module):  # a stand-in feature: per-image sums, and the batches it saw
        source, seen = "test", []

        def forward(self, x):
            self.seen.append(x.shape[0])
            return x.double().flatten(1).sum(1, keepdim=True).repeat(1, 3)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 4, 4), generator=g, dtype=torch.uint8)
    cached = _CachedInception(Inner())
    ref = Inner()(x)
    assert torch.equal(cached(x[:3]), ref[:3])
    mixed = torch.stack([x[4], x[0], x[3], x[0]])  # two new images, one seen image twice
    assert torch.equal(cached(mixed), ref[[4, 0, 3, 0]])
    assert Inner.seen[1:] == [3, 2] and len(cached.cache) == 5  # only the new images went through
    c = AblationConfig(eval_crops_per_photo=32, tsne_runs=1)
    # 96 originals took 19.2 s: a run's evaluation is its 96 reconstructions + 15 images' time for the rest
    assert _eval_estimate_s(c, 1, (19.2, 96)) == pytest.approx((96 + 15) * 0.2)


def test_a_run_that_completes_its_seed_may_end_a_little_after_the_budget():
    from hieratok.ablation import AblationConfig, _may_start

    # 100 s left; a 110 s run: seed 0 always starts, a seed's last run within the grace, others not
    assert _may_start(110.0, 0.0, 100.0, 20.0, 0, completes_seed=False)
    assert _may_start(110.0, 0.0, 100.0, 20.0, 2, completes_seed=True)
    assert not _may_start(110.0, 0.0, 100.0, 20.0, 2, completes_seed=False)
    assert not _may_start(130.0, 0.0, 100.0, 20.0, 2, completes_seed=True)
    assert _may_start(100.0, 0.0, 100.0, 0.0, 1, completes_seed=False)
    with pytest.raises(ValueError, match="slack"):
        AblationConfig(slack=1.0)


def test_an_evaluation_scores_every_held_out_image_without_a_shortfall_warning(caplog):
    # 3 embedded held-out photos x 32 crops; the evaluation asks for exactly these, so nothing is
    # reported as missing (each run's evaluation used to warn twice about "num=1000000")
    c = AblationConfig(eval_crops_per_photo=32, kid=False)
    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny").eval()
    with caplog.at_level(logging.WARNING):
        res = _evaluate(c, model, None, seed=0)
    assert res["num_images"] == 96 and res["uniformity"]["num_points"] == 96
    shortfall = [r for r in caplog.records if r.name.startswith("hieratok.evaluate") and r.levelno >= logging.WARNING]
    assert not shortfall, caplog.text


def test_plan_check_compares_the_median_step_once_and_stops_the_runs_beside_it():
    from types import SimpleNamespace

    from hieratok.ablation import PlanChanged, _PlanCheck

    def feed(check, times):
        for t in times:
            check.step_done(t)

    # three warm-up steps are not timed; then the median over >= 5 steps and >= 1 s against 0.5 s planned
    stop = SimpleNamespace(value=0)
    ok = _PlanCheck(None, "m", 0.5, 1.0, 1.25, stop)
    feed(ok, [9.0, 9.0, 9.0, 0.55, 0.6, 0.45, 0.5, 0.58, 9.0, 9.0])  # median 0.55: within 1.25x; checked once
    assert ok.checked and ok.ratio() == pytest.approx(0.55 / 0.5) and stop.value == 0
    slow = _PlanCheck(None, "m", 0.5, 1.0, 1.25, stop)
    feed(slow, [9.0] * 3 + [0.7, 0.7, 0.8, 0.7])  # four timed steps: not yet
    with pytest.raises(PlanChanged) as e:
        slow.step_done(0.7)
    assert e.value.ratios == {"m": pytest.approx(1.4)} and stop.value == 1
    beside = _PlanCheck(None, "s", 0.5, 1.0, 1.25, stop)  # a run beside it stops at its next step, without a ratio
    with pytest.raises(PlanChanged) as e:
        beside.step_done(0.5)
    assert e.value.ratios == {"s": None}
    fast, stop.value = _PlanCheck(None, "m", 0.5, 0.1, 1.25, stop), 0  # faster than 1/1.25 also plans again
    with pytest.raises(PlanChanged) as e:
        feed(fast, [1.0] * 3 + [0.3] * 5)
    assert e.value.ratios == {"m": pytest.approx(0.6)}
    with pytest.raises(ValueError, match="replan_factor"):
        AblationConfig(replan_factor=1.0)


def test_a_plan_change_starts_no_more_runs_and_waits_for_those_under_way(monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from hieratok import ablation
    from hieratok.ablation import PlanChanged, Variant, _run_parallel

    stop, started = SimpleNamespace(value=0), []

    def fake_run(c, v, seed, steps, out, planned, check_s=None):  # the first runs check; seed 0 finds the plan off
        started.append((v.name, seed, check_s))
        if check_s is None:
            return
        if seed == 0:
            stop.value = 1
            raise PlanChanged({"multi": 2.0})
        while not stop.value:
            time.sleep(0.001)
        raise PlanChanged({"multi": 3.0 if seed == 1 else None})

    monkeypatch.setattr(ablation, "_run_in_process", fake_run)
    m = Variant("multi", "tiny")
    jobs = [(m, s) for s in range(4)]
    c = AblationConfig(seeds=4, variants=("multi",), baseline="multi", progress=False)
    with ThreadPoolExecutor(2) as pool, pytest.raises(PlanChanged) as e:
        _run_parallel(c, jobs, 10, tmp_path, {"multi": 0.5}, pool, 2, 0.0, math.inf, check=True)
    assert e.value.ratios == {"multi": pytest.approx(2.5)} and started == [("multi", 0, 0.5), ("multi", 1, 0.5)]
    started.clear()
    with ThreadPoolExecutor(2) as pool:  # without the check every job runs
        _run_parallel(c, jobs, 10, tmp_path, {"multi": 0.5}, pool, 2, 0.0, math.inf)
    assert sorted(started) == [("multi", s, None) for s in range(4)]
