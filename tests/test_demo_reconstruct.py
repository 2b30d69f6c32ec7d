import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hieratok import HieraTok
from hieratok.cli import main
from hieratok.demo import DemoConfig, run_demo


def test_demo_end_to_end_small_budget(tmp_path):
    # the default schedule: on a machine with several cores the runs train in processes side by side
    cfg = DemoConfig(steps=2, seeds=2, out=str(tmp_path / "demo"), batch_size=4, eval_crops_per_photo=2, tsne_runs=1,
                     progress=False)
    res = run_demo(cfg)
    out = tmp_path / "demo"
    for f in ["report.html", "report.md", "reconstructions.png", "pyramid.png", "curves.png", "tsne_multi.png",
              "tsne_single.png", "psnr_per_scale.png", "summary.json", "ablation.json", "full_photo.png"]:
        assert (out / f).is_file(), f
    # the whole held-out photo at its own aspect (chelsea 451x300 at short side 128: 192x128), both twins side by side
    photo = torch.load(out / "runs" / "multi" / "seed0" / "full_photo.pt", weights_only=True)
    assert photo["recon"].shape == photo["input"].shape and photo["input"].shape[-2] == 128
    assert Image.open(out / "full_photo.png").size == (3 * photo["input"].shape[-1] + 16, 128)
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and s["seeds_done"] == 2 and "cpu" in s
    assert s["workers"] == min(4, os.cpu_count() or 1) and s["threads"] == max(1, (os.cpu_count() or 1) // s["workers"])
    for seed in (0, 1):
        r = {k: json.loads((out / "runs" / k / f"seed{seed}" / "result.json").read_text()) for k in ("multi", "single")}
        assert r["multi"]["num_images"] == r["single"]["num_images"] == 6
        assert list(r["multi"]["psnr_per_scale"]) == ["8", "16", "32", "64"] and len(r["single"]["psnr_per_scale"]) == 1
        assert r["multi"]["uniformity"]["protocol"] == "vavae" and r["multi"]["uniformity"]["normalization"] == "train"
        # both twins of a seed saw the same data: the same number of logged steps
        csv = {k: (out / "runs" / k / f"seed{seed}" / "metrics.csv").read_text().count("\n") for k in r}
        assert csv["multi"] == csv["single"]
    t1, t2 = res["tables"]
    assert "±" in t1.to_text() and "p=" in t2.to_text() or "within seed spread" in t2.to_text()
    html = (out / "report.html").read_text()
    assert "not LPIPS" in html and "tsne_multi.png" in html and "What these numbers support" in html
    assert "rKID" in html and "rank-deficient" in html
    # a second demo into the same folder refuses instead of destroying the first
    with pytest.raises(ValueError, match="not empty"):
        run_demo(cfg)
    assert main(["demo", "--steps", "1", "--out", str(out)]) == 2


def _calibration_claims_faster(monkeypatch, factor=6.0):
    """The real one-process calibration, its step times divided by ``factor``; evaluation planned at 0 s."""
    from hieratok import ablation

    calibrate = ablation._calibrate

    def optimistic(*a):
        per_step, threads, timings = calibrate(*a)
        return {k: v / factor for k, v in per_step.items()}, threads, timings

    monkeypatch.setattr(ablation, "_calibrate", optimistic)
    monkeypatch.setattr(ablation, "_eval_estimate_s", lambda *a: 0.0)


def test_demo_time_budget_keeps_whole_schedules_and_says_how_many_seeds(tmp_path, caplog, monkeypatch):
    """Calibration runs on throw-away trainers: the real runs start at step 0 with the warm-up LR;
    a budget too small for every seed stops after a complete round and says so."""
    from hieratok.ablation import AblationConfig, run_ablation
    from hieratok.train import lr_at

    _calibration_claims_faster(monkeypatch)  # 6x: the first round alone outlasts the budget
    c = AblationConfig(minutes=0.25, seeds=5, out=str(tmp_path / "a"), batch_size=2, eval_crops_per_photo=1,
                       kid=False, uniformity=False, report_reserve_s=0.0, progress=False, threads=1, workers=1,
                       replan_factor=None)
    res = run_ablation(c)
    steps = res["steps"]
    assert res["replan"] is None
    assert steps >= 1 and 1 <= res["seeds_done"] < 5
    assert f"{res['seeds_done']} of 5 seeds done" in caplog.text
    for name in ("single", "multi"):
        hist = [line.split(",") for line in (tmp_path / "a" / "runs" / name / "seed0" / "metrics.csv").read_text().splitlines()]
        head = hist[0]
        first = dict(zip(head, hist[1]))
        assert int(first["step"]) == min(5, steps)  # no calibration rows in the run's log (log_every=5)
        lr = float(first["lr"])  # the demo's optimiser: lr 4e-4 -> 4e-5, 3% warm-up
        assert lr == pytest.approx(sum(lr_at(s, steps, 4e-4, 4e-5, 0.03) for s in range(min(5, steps))) / min(5, steps),
                                   rel=1e-5)


def _last_logged_step(run_dir):
    return int(run_dir.joinpath("metrics.csv").read_text().splitlines()[-1].split(",")[0])


def test_a_calibration_the_first_run_contradicts_is_planned_again(tmp_path, monkeypatch):
    """Calibration timed while the machine was faster than it is (here: claimed 50x faster): the first
    run finds out after its first timed steps, and every run starts again with the steps that now
    fit, all with the same count (the comparison stays paired)."""
    import json

    from hieratok.ablation import AblationConfig, run_ablation

    # 50x: the first run's check finds it off even if the machine sped up a lot after calibration
    _calibration_claims_faster(monkeypatch, 50.0)
    c = AblationConfig(minutes=0.25, seeds=2, out=str(tmp_path / "a"), batch_size=2, eval_crops_per_photo=1,
                       kid=False, uniformity=False, report_reserve_s=0.0, progress=False, threads=1, workers=1,
                       calibrate_s=0.5)
    res = run_ablation(c)
    r = res["replan"]
    # the first run (single, seed 0) timed 50x its claimed step; multi, untimed, is taken to be as far off
    assert r is not None and set(r["ratios"]) == {"single"} and r["ratios"]["single"] > 1.25
    assert r["steps_after"] == res["steps"] < r["steps_before"]
    assert json.loads((tmp_path / "a" / "ablation.json").read_text())["steps"] == res["steps"]
    assert any("started again" in line for line in res["load_notes"])
    done = sorted(tmp_path.glob("a/runs/*/seed*/result.json"))
    assert len(done) >= 2 and {_last_logged_step(p.parent) for p in done} == {res["steps"]}


def test_runs_in_processes_plan_again_together(tmp_path):
    """Several processes: a first run that finds the plan off (here any difference: a factor just above
    1) stops the run beside it through the shared flag, and both start again with the new steps.
    Threads not given: with more cores than processes, the fastest variant is also timed alone on
    all cores (the schedule's last run takes them)."""
    import os

    from hieratok.ablation import AblationConfig, run_ablation

    c = AblationConfig(minutes=0.5, seeds=1, out=str(tmp_path / "p"), batch_size=2, eval_crops_per_photo=1, kid=False,
                       uniformity=False, report_reserve_s=0.0, progress=False, workers=2, calibrate_s=0.5,
                       replan_factor=1.000001)
    res = run_ablation(c)
    assert res["replan"] is not None and res["replan"]["steps_after"] == res["steps"] and res["seeds_done"] == 1
    per = res["calibrated_s_per_step"]
    if (os.cpu_count() or 1) > res["threads"]:
        ((name, speedup),) = res["alone_speedup"].items()
        assert name == min(per, key=per.get) and speedup >= 1.0
    else:
        assert res["alone_speedup"] == {}
    for name in ("single", "multi"):
        assert _last_logged_step(tmp_path / "p" / "runs" / name / "seed0") == res["steps"]


def test_runs_in_processes_side_by_side_equal_runs_one_after_the_other(tmp_path):
    """The parallel schedule (each run in a spawned process) is the sequential one (each run in this
    process) at the same thread count: same steps, same data, same numbers, bit for bit."""
    from hieratok.ablation import AblationConfig, run_ablation

    res = {}
    for workers in (1, 2):
        c = AblationConfig(steps=3, seeds=1, out=str(tmp_path / f"w{workers}"), batch_size=2, eval_crops_per_photo=1,
                           kid=False, uniformity=False, progress=False, threads=1, workers=workers)
        res[workers] = run_ablation(c)
        assert res[workers]["workers"] == workers and res[workers]["seeds_done"] == 1
    for name in ("single", "multi"):
        a, b = (res[w]["results"][name][0] for w in (1, 2))
        keys = [k for k in a if "seconds" not in k]
        assert keys and {k: a[k] for k in keys} == {k: b[k] for k in keys}
        logs = [(tmp_path / f"w{w}" / "runs" / name / "seed0" / "metrics.csv").read_text().splitlines() for w in (1, 2)]
        cols = logs[0][0].split(",")
        drop = {i for i, k in enumerate(cols) if k in ("img_per_s", "threads")}
        assert [[v for i, v in enumerate(r.split(",")) if i not in drop] for r in logs[0]] == \
               [[v for i, v in enumerate(r.split(",")) if i not in drop] for r in logs[1]]


def test_reconstruct_crop_and_tile(tmp_path, capsys):
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    assert main(["reconstruct", str(tmp_path / "photo.jpg"), str(tmp_path / "gray.png"), "--checkpoint",
                 str(tmp_path / "tok")]) == 0
    assert Image.open(tmp_path / "photo.recon.png").size == (64, 64)
    assert Image.open(tmp_path / "photo.pyramid.png").size[0] > 64
    assert main(["reconstruct", str(tmp_path / "photo.jpg"), "--checkpoint", str(tmp_path / "tok"), "--mode", "tile",
                 "--out", str(tmp_path / "tiles")]) == 0
    assert Image.open(tmp_path / "tiles" / "photo.recon.png").size == (150, 100)  # the whole image, own size


def test_full_and_tile_modes_reconstruct_the_whole_image():
    import torch

    from hieratok.tokenizers.tiling import tiled_reconstruct
    from hieratok.workflows.reconstruct import reconstruct_image

    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).eval()
    x = torch.rand(3, 100, 150) * 2 - 1
    want = [(3, round(100 * s / 64), round(150 * s / 64)) for s in (8, 16, 32, 64)]
    tiled = reconstruct_image(model, x, "tile", batch_size=4)
    assert [tuple(t.shape) for t in tiled] == want
    assert all(torch.equal(a, b[0]) for a, b in zip(tiled, tiled_reconstruct(model, x[None], 64, 16, 4)))
    full = reconstruct_image(model, x, "full")  # reflect-padded to 104 x 152 (multiples of the patch 8)
    xp = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 4), (0, 2)), mode="reflect"))
    with torch.no_grad():
        ref = model.decode(model.encode(xp[None]).mode())[0, :, :100, :150]
    assert [tuple(t.shape) for t in full][-1] == (3, 100, 150) and torch.equal(full[-1], ref)
    assert torch.equal(reconstruct_image(model, x, "auto")[-1], full[-1])  # 15,000 px <= 16 x 64^2


@pytest.mark.parametrize("content,match", [(None, "no such file"), (b"not an image", "cannot read image")])
def test_reconstruct_bad_input_is_one_line(tmp_path, capsys, content, match):
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    f = tmp_path / "x.jpg"
    if content is not None:
        f.write_bytes(content)
    assert main(["reconstruct", str(f), "--checkpoint", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_reconstruct_names_are_unique_and_nothing_is_overwritten(tmp_path):
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(tmp_path / d / "x.png")
    args = ["reconstruct", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), str(tmp_path / "a" / "x.png"),
            "--checkpoint", str(tmp_path / "tok"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.recon.png")) == ["x-1.recon.png", "x-2.recon.png"]
    one, two = (np.asarray(Image.open(tmp_path / "out" / f"x-{k}.input.png")) for k in (1, 2))
    assert not np.array_equal(one, two)  # each input kept its own output
    before = (tmp_path / "out" / "x-1.recon.png").read_bytes()
    assert main(args) == 2  # outputs exist: refused
    assert main(args + ["--overwrite"]) == 0
    assert (tmp_path / "out" / "x-1.recon.png").read_bytes() == before


def test_parallel_budget_calibrates_side_by_side_and_skips_runs_that_cannot_end(tmp_path, caplog):
    """Several processes with a time budget: both variants are timed at once, and a budget far too
    small still finishes seed 0 of every variant (as the sequential schedule always finishes its
    first round) and does not start the runs that cannot end within it, saying so."""
    from hieratok.ablation import AblationConfig, run_ablation

    c = AblationConfig(minutes=0.05, seeds=3, out=str(tmp_path / "p"), batch_size=2, eval_crops_per_photo=1, kid=False,
                       uniformity=False, report_reserve_s=0.0, progress=False, threads=1, workers=2, calibrate_s=0.5)
    res = run_ablation(c)
    assert res["workers"] == 2 and res["steps"] == 1 and res["seeds_done"] == 1
    assert set(res["calibrated_s_per_step"]) == {"single", "multi"} and min(res["calibrated_s_per_step"].values()) > 0
    assert "budget: not starting" in caplog.text
    assert sorted(p.parent.name + "/" + p.name for p in (tmp_path / "p" / "runs").glob("*/seed*")
                  if (p / "result.json").is_file()) == ["multi/seed0", "single/seed0"]
