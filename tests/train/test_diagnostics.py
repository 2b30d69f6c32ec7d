"""Training diagnostics: held-out per-scale PSNR and colour error, posterior SNR, their CSV /
TensorBoard columns, and that turning them on leaves the training trajectory unchanged."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from hieratok import HieraTok
from hieratok.checkpoint import latest_checkpoint
from hieratok.data import EmbeddedPhotos
from hieratok.distributions import DiagonalGaussian
from hieratok.metrics import psnr
from hieratok.train import TrainConfig, Trainer, load_config
from hieratok.train.diagnostics import fixed_images, posterior_stats, reconstruction_diagnostics
from hieratok.train.tasks import TokenizerTask

FAST = {"adapt_threads": False,  # fixed threads: trajectories are compared bit for bit
        "model.encoder_depth": 1, "model.decoder_depth": 2, "progress": False, "tensorboard": False,
        "image_every": 0, "log_every": 1, "batch_size": 4, "data.samples_per_epoch": 24,
        "loss.perceptual": 0.0, "ckpt_every": 0}
SIDES = (8, 16, 32, 64)  # the tiny preset: 64 px images, token grids 1, 2, 4, 8 of 8 px patches
DIAG = [f"heldout_psnr_s{s}" for s in SIDES] + ["heldout_color_err", "heldout_color_err_r", "heldout_color_err_g",
                                                "heldout_color_err_b"]
POSTERIOR = ["posterior_snr", "posterior_snr_median", "posterior_std"]


def cfg_for(tmp_path, name="run", **kw) -> TrainConfig:
    return load_config(overrides={**FAST, "out_dir": str(tmp_path / name), **kw})


def read_csv(run) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_columns_land_in_metrics_csv_and_tensorboard_on_their_own_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(cfg_for(tmp_path, steps=5, diag_every=2, log_every=3, tensorboard=True)).fit()
    rows = read_csv(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 5]  # one row per step that logs anything
    per_scale = [f"{k}_s{s}" for k in ("l1",) for s in SIDES]
    assert set(rows[0]) >= {*DIAG, *POSTERIOR, *per_scale, "loss"}
    by_step = {int(r["step"]): r for r in rows}
    for step in (2, 4, 5):  # diag_every=2, and the last step
        assert all(math.isfinite(float(by_step[step][k])) for k in DIAG), step
    for step in (3, 5):  # log_every=3, and the last step
        assert all(math.isfinite(float(by_step[step][k])) for k in POSTERIOR + per_scale + ["loss"]), step
    assert by_step[2]["loss"] == "" and by_step[3]["heldout_psnr_s64"] == ""
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags >= {*DIAG, *POSTERIOR, *per_scale}
    assert [e.step for e in acc.Scalars("heldout_psnr_s64")] == [2, 4, 5]
    assert [e.step for e in acc.Scalars("posterior_snr")] == [3, 5]


def test_resumed_run_writes_the_same_rows_as_an_uninterrupted_one(tmp_path):
    common = dict(steps=7, diag_every=3, log_every=2, ckpt_every=2)
    Trainer(cfg_for(tmp_path, "full", **common)).fit()
    part = cfg_for(tmp_path, "part", **common)
    Trainer(part).fit(max_steps=5)  # killed after step 5 (diagnostics at 3, logs at 2, 4, 5); checkpoint at 4
    Trainer(part).fit(resume="auto")
    full, resumed = read_csv(tmp_path / "full"), read_csv(tmp_path / "part")
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == ["2", "3", "4", "6", "7"]
    for a, b in zip(full, resumed):
        assert set(a) == set(b)
        for k in a:
            if k != "img_per_s":
                assert (a[k] == "") == (b[k] == ""), (a["step"], k)
                if a[k] != "":
                    assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5, abs=1e-6), (a["step"], k)


def heldout_batch(n: int = 8) -> torch.Tensor:
    """The diagnostics' documented choice, written out: indices i * len // n of the held-out crops."""
    data = EmbeddedPhotos("heldout", 64)
    return torch.stack([data[i * len(data) // n][0] for i in range(n)])


@pytest.mark.parametrize("ema_decay", [0.9, 0.0])
def test_heldout_psnr_equals_an_independent_computation_with_the_saved_weights(tmp_path, ema_decay):
    Trainer(cfg_for(tmp_path, steps=4, diag_every=2, ema_decay=ema_decay)).fit()
    ckpt = latest_checkpoint(tmp_path / "run")
    model = HieraTok.from_pretrained(ckpt).eval()
    if ema_decay > 0:  # the diagnostics score the EMA weights
        model.load_state_dict(load_file(str(ckpt / "ema.safetensors")), strict=False)
    x = heldout_batch()
    with torch.no_grad():
        pyr = model.decode(model.encode(x).mode(), all_scales=True)
    row = read_csv(tmp_path / "run")[-1]
    assert row["step"] == "4"
    for rec, side in zip(pyr, SIDES):
        tgt = x if side == 64 else F.interpolate(x, size=(side, side), mode="area")
        want = float(psnr(rec, tgt, reduction="none", floor_mse=True).mean())
        assert float(row[f"heldout_psnr_s{side}"]) == pytest.approx(want, rel=1e-6, abs=1e-6), side
    cast = (pyr[-1] - x).mean(dim=(2, 3)).abs().mean(0)
    for c, v in zip("rgb", cast.tolist()):
        assert float(row[f"heldout_color_err_{c}"]) == pytest.approx(v, rel=1e-5, abs=1e-7)


def test_color_error_of_a_constant_offset_is_that_offset():
    x = torch.rand(3, 3, 16, 16) * 1.6 - 0.8
    offset = torch.tensor([0.1, -0.05, 0.02]).view(1, 3, 1, 1)
    sign = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1, 1)  # casts of both signs: per image, not cancelled
    fine = x + sign * offset
    coarse = F.interpolate(x, size=(8, 8), mode="area")  # an exact coarse reconstruction
    out = reconstruction_diagnostics(x, [coarse, fine])
    for c, v in zip("rgb", (0.1, 0.05, 0.02)):
        assert float(out[f"heldout_color_err_{c}"]) == pytest.approx(v, abs=1e-6)
    assert float(out["heldout_color_err"]) == pytest.approx(0.17 / 3, abs=1e-6)
    # PSNR: the exact scale at the 8-bit floor (10 log10(255^2 C H W)), the offset scale by its formula
    assert float(out["heldout_psnr_s8"]) == pytest.approx(10 * math.log10(255**2 * 3 * 8 * 8))
    assert float(out["heldout_psnr_s16"]) == pytest.approx(float(psnr(fine, x)))


def test_a_diverged_reconstruction_scores_nan_instead_of_raising():
    x = torch.zeros(2, 3, 8, 8)
    rec = x.clone()
    rec[0, 0, 0, 0] = float("nan")
    out = reconstruction_diagnostics(x, [rec])
    assert math.isnan(float(out["heldout_psnr_s8"]))


def test_posterior_snr_matches_a_hand_computation():
    mu = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5]).view(1, 5, 1, 1)
    sigma = torch.tensor([1.0, 0.5, 2.0, 4.0, 0.25]).view(1, 5, 1, 1)
    stats = posterior_stats(DiagonalGaussian(torch.cat([mu, 2 * sigma.log()], dim=1)))
    assert float(stats["posterior_snr"]) == pytest.approx((10.5 / 5) / (7.75 / 5))
    assert float(stats["posterior_snr_median"]) == pytest.approx(1.5)  # ratios 1, 4, 1.5, 1, 2
    assert float(stats["posterior_std"]) == pytest.approx(7.75 / 5)


def test_logged_posterior_snr_is_that_of_the_first_training_batch(tmp_path):
    cfg = cfg_for(tmp_path, steps=1, diag_every=0)
    same = Trainer(cfg_for(tmp_path, "twin", steps=1, diag_every=0))  # same seed: same weights and data order
    x = same.next_batch()[0]
    with torch.no_grad():
        post = same.raw["model"].encode(x)
    hist = Trainer(cfg).fit()
    assert hist[0]["posterior_snr"] == pytest.approx(float(post.mean.abs().mean() / post.std.mean()), rel=1e-5)
    assert hist[0]["posterior_std"] == pytest.approx(float(post.std.mean()), rel=1e-5)


def test_diagnostics_do_not_change_the_training_trajectory(tmp_path):
    # decoder drop-path and the posterior sample draw from the RNG; the EMA weights are swapped in and out
    common = dict(steps=5, ckpt_every=5, ema_decay=0.9, **{"model.decoder_drop_path": 0.1})
    off = Trainer(cfg_for(tmp_path, "off", diag_every=0, **common)).fit()
    on = Trainer(cfg_for(tmp_path, "on", diag_every=1, **common)).fit()
    assert all("heldout_psnr_s64" in h for h in on) and not any("heldout_psnr_s64" in h for h in off)
    assert [h["loss"] for h in on] == [h["loss"] for h in off]  # bit for bit
    for name in ("model.safetensors", "ema.safetensors", "optim.safetensors"):
        a = load_file(str(tmp_path / "off/checkpoints/step_00000005" / name))
        b = load_file(str(tmp_path / "on/checkpoints/step_00000005" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_diagnostic_batch_is_held_out_or_named_as_training_images(tmp_path):
    for folder, n in (("train", 5), ("val", 3)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.new("RGB", (80, 72), (40 * i, 100, 200)).save(tmp_path / folder / f"{i}.png")
    x, what = TokenizerTask(cfg_for(tmp_path)).diagnostic_images()
    assert x.shape == (8, 3, 64, 64) and "embedded held-out photos" in what
    torch.testing.assert_close(x, heldout_batch())
    x, what = TokenizerTask(cfg_for(tmp_path, **{"data.path": str(tmp_path / "train")})).diagnostic_images()
    assert x.shape == (5, 3, 64, 64) and "TRAINING images" in what  # no held-out split: said so in the log
    x, what = TokenizerTask(cfg_for(tmp_path, diag_data=str(tmp_path / "val"), diag_images=2,
                                    **{"data.path": str(tmp_path / "train")})).diagnostic_images()
    assert x.shape == (2, 3, 64, 64) and what.startswith("2 fixed held-out images of")
    assert x[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 40 / 127.5 - 1], abs=1e-6)  # val/0.png, val/1.png
    with pytest.raises(ValueError, match="diag_every"):
        cfg_for(tmp_path, diag_every=-1)


def test_fixed_images_spread_and_skip_unreadable_items():
    data = [None if i == 3 else (torch.full((1, 2, 2), float(i)), 0) for i in range(10)]
    x = fixed_images(data, 4)  # indices 0, 2, 5, 7
    assert x[:, 0, 0, 0].tolist() == [0, 2, 5, 7]
    data[5] = None
    assert fixed_images(data, 4)[:, 0, 0, 0].tolist() == [0, 2, 6, 7]
    assert fixed_images(iter(data), 3)[:, 0, 0, 0].tolist() == [0, 1, 2]
