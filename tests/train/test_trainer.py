import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hieratok import HieraTok
from hieratok.train import NonFiniteLossError, Trainer, TrainConfig, load_config, lr_at
from hieratok.train.checkpoint import latest_checkpoint

FAST = {"model.encoder_depth": 1, "model.decoder_depth": 2, "progress": False, "tensorboard": False,
        "image_every": 0, "log_every": 1, "batch_size": 4, "data.samples_per_epoch": 24,
        "loss.perceptual": 0.0}


def cfg_for(tmp_path, name="run", **kw) -> TrainConfig:
    return load_config(overrides={**FAST, "out_dir": str(tmp_path / name), **kw})


@pytest.mark.parametrize("preset", ["tiny", "tiny-single"])
def test_loss_goes_down_on_embedded_photos(tmp_path, preset):
    from hieratok.data import EmbeddedPhotos

    cfg = cfg_for(tmp_path, preset=preset, steps=30, ckpt_every=0, **{"optim.lr": 1e-3, "optim.end_lr": 1e-3})
    t = Trainer(cfg)
    held = torch.stack([EmbeddedPhotos("heldout", 64)[i][0] for i in range(8)])

    def heldout_l1() -> float:
        m = t.raw["model"].eval()
        with torch.no_grad():
            return float((m.decode(m.encode(held).mode()) - held).abs().mean())

    before = heldout_l1()
    hist = t.fit()
    after = heldout_l1()
    assert after < 0.7 * before, (before, after)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # the final checkpoint is a loadable model directory
    m = HieraTok.from_pretrained(latest_checkpoint(tmp_path / "run"))
    assert m.config.multiscale == (preset == "tiny")


def test_resume_follows_the_uninterrupted_trajectory(tmp_path):
    common = dict(steps=8, ckpt_every=3, **{"optim.warmup_ratio": 0.25, "loss.perceptual": 1.0})
    full = Trainer(cfg_for(tmp_path, "full", **common)).fit()
    part = cfg_for(tmp_path, "part", **common)
    Trainer(part).fit(max_steps=5)  # "killed" after step 5; last checkpoint at step 3
    assert latest_checkpoint(tmp_path / "part").name == "step_00000003"
    (tmp_path / "part" / "checkpoints" / ".tmp-step_00000006-999").mkdir()  # a save cut short
    resumed = Trainer(part).fit(resume="auto")
    assert [h["step"] for h in resumed] == [4, 5, 6, 7, 8]
    for a, b in zip(full[3:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
    w_full = load_file(str(tmp_path / "full/checkpoints/step_00000008/model.safetensors"))
    w_res = load_file(str(tmp_path / "part/checkpoints/step_00000008/model.safetensors"))
    e_full = load_file(str(tmp_path / "full/checkpoints/step_00000008/ema.safetensors"))
    e_res = load_file(str(tmp_path / "part/checkpoints/step_00000008/ema.safetensors"))
    for k in w_full:
        torch.testing.assert_close(w_full[k], w_res[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e_full[k], e_res[k], rtol=1e-5, atol=1e-6)
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert ckpts == ["step_00000006", "step_00000008"] or ckpts[-1] == "step_00000008"
    assert not any(p.startswith(".tmp") for p in ckpts)


def test_keep_last_and_checkpoint_contents(tmp_path):
    Trainer(cfg_for(tmp_path, steps=4, ckpt_every=1, keep_last=2)).fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    d = root / "step_00000004"
    assert {p.name for p in d.iterdir()} >= {"config.json", "model.safetensors", "ema.safetensors",
                                            "optim.safetensors", "trainer_state.json"}
    state = json.loads((d / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["sampler"]["consumed"] == 16 and state["train_config"]["steps"] == 4
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 5  # header + 4 steps


def test_resume_refuses_another_architecture(tmp_path):
    Trainer(cfg_for(tmp_path, steps=1, ckpt_every=1)).fit()
    other = cfg_for(tmp_path, steps=2, **{"model.latent_channels": 4})
    with pytest.raises(ValueError, match="latent_channels"):
        Trainer(other).fit(resume="auto")


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    t = Trainer(cfg_for(tmp_path, steps=10, ckpt_every=0, max_nonfinite=3))
    real = t.phases[0].loss_fn
    calls = {"n": 0}

    def flaky(mods, x, ctx, step):
        out = real(mods, x, ctx, step)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    t.phases[0].loss_fn = flaky
    before = {k: v.clone() for k, v in t.raw["model"].state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        t.fit()
    assert t.step == 2 and t.nonfinite_total == 4  # steps 1 and 3 of the data ran, the NaN ones were skipped
    assert latest_checkpoint(tmp_path / "run") is not None
    assert all(torch.isfinite(v).all() for v in t.raw["model"].state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in t.raw["model"].state_dict().items())


def test_lr_schedule_closed_form():
    assert lr_at(0, 100, 1.0, 0.1, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 0.1, 0.1) == pytest.approx(1.0)
    mid = 10 + 45
    assert lr_at(mid, 100, 1.0, 0.1, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 1.0, 0.1, 0.1) == pytest.approx(0.1)


def test_config_overrides_and_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("preset: tiny-single\noptim:\n  lr: 0.0003\nmodel:\n  scales: [8]\n")
    cfg = load_config(y, {"loss.kl": 1e-5, "optim.betas": [0.9, 0.99]})
    assert cfg.preset == "tiny-single" and cfg.optim.lr == 3e-4 and cfg.loss.kl == 1e-5
    assert cfg.optim.betas == (0.9, 0.99) and cfg.model == {"scales": [8]}
    with pytest.raises(ValueError, match="has no field 'lrr'"):
        load_config(overrides={"optim.lrr": 1})
    # nested configs check the overridden values, all keys applied first (order does not matter)
    with pytest.raises(ValueError, match="perceptual_kind='none' needs loss.perceptual=0"):
        load_config(overrides={"loss.perceptual_kind": "none"})
    with pytest.raises(ValueError, match="unknown DiffAugment group 'colr'"):
        load_config(overrides={"gan.diffaug": "colr"})
    assert load_config(overrides={"loss.perceptual_kind": "none", "loss.perceptual": 0.0}).loss.perceptual == 0.0


def test_gan_stage_two_optimizers_and_resume(tmp_path):
    over = {"gan.weight": 0.6, "gan.start_step": 1, "gan.ndf": 8, "steps": 3, "ckpt_every": 2}
    t = Trainer(cfg_for(tmp_path, **over))
    assert [p.name for p in t.phases] == ["g", "d"]
    d0 = {k: v.clone() for k, v in t.raw["disc"].state_dict().items()}
    hist = t.fit(max_steps=2)
    assert "d_d_loss" not in hist[0]  # step 0: before gan.start_step
    assert "d_d_loss" in hist[1] and "g_loss" in hist[1]  # the discriminator runs from step 1
    assert any(not torch.equal(d0[k], v) for k, v in t.raw["disc"].state_dict().items())
    ckpt = latest_checkpoint(tmp_path / "run")
    assert (ckpt / "disc.safetensors").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert set(state["optim_groups"]) == {"g", "d"}
    t2 = Trainer(cfg_for(tmp_path, **over))
    t2.fit(resume="auto")
    assert t2.step == 3
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "d_d_loss" in header and "d_accuracy" not in header[:3]


def test_cli_train_on_a_folder_with_a_corrupt_file(tmp_path, caplog):
    import numpy as np
    from PIL import Image

    from hieratok.cli import main

    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2"] + \
        [f"{k}={v}" for k, v in {**FAST, "data.samples_per_epoch": 8}.items()]
    assert main(args) == 0
    assert "broken.jpg" in caplog.text
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"


def test_cli_train_on_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    from hieratok.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "empty" in err
