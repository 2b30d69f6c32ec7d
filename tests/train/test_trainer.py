import csv
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hieratok import HieraTok
from hieratok.checkpoint import latest_checkpoint
from hieratok.train import NonFiniteLossError, TrainConfig, Trainer, load_config, lr_at

FAST = {"adapt_threads": False,  # fixed threads: trajectories are compared bit for bit
        "model.encoder_depth": 1, "model.decoder_depth": 2, "progress": False, "tensorboard": False,
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
    common = dict(steps=8, ckpt_every=3, keep_last=2, **{"optim.warmup_ratio": 0.25, "loss.perceptual": 1.0})
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
    assert ckpts == ["step_00000006", "step_00000008"]  # keep_last=2, and no .tmp-* left
    # metrics.csv: the killed run's rows after its checkpoint (4, 5) are replaced, not duplicated
    with open(tmp_path / "part" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    for a, r in zip(full, rows):
        assert float(r["loss"]) == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)


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


def test_init_from_applies_or_refuses_every_model_key(tmp_path):
    src = HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=2)
    src.save_pretrained(tmp_path / "stage1")
    t = Trainer(cfg_for(tmp_path, init_from=str(tmp_path / "stage1"), **{"model.decoder_drop_path": 0.1}))
    m = t.raw["model"]
    assert m.config.decoder_drop_path == 0.1 and m.config.encoder_depth == 1
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with pytest.raises(ValueError, match="latent_channels"):
        Trainer(cfg_for(tmp_path, init_from=str(tmp_path / "stage1"), **{"model.latent_channels": 4}))


def test_resume_refuses_other_modules_and_names_the_fields(tmp_path):
    Trainer(cfg_for(tmp_path, steps=1, ckpt_every=1, ema_decay=0.0)).fit()  # stage 1, no EMA
    with pytest.raises(ValueError, match=r"gan.weight > 0: False -> True.*init_from"):
        Trainer(cfg_for(tmp_path, steps=2, **{"gan.weight": 0.6, "gan.ndf": 8})).fit(resume="auto")
    gan = {"gan.weight": 0.6, "gan.ndf": 8, "gan.start_step": 0}
    Trainer(cfg_for(tmp_path, "gan", steps=1, ckpt_every=1, **gan)).fit()
    with pytest.raises(ValueError, match="gan.ndf: 8 -> 16"):
        Trainer(cfg_for(tmp_path, "gan", steps=2, **{**gan, "gan.ndf": 16})).fit(resume="auto")


def test_resume_without_ema_weights_starts_the_ema_from_the_model(tmp_path):
    Trainer(cfg_for(tmp_path, steps=1, ckpt_every=1, ema_decay=0.0)).fit()
    t = Trainer(cfg_for(tmp_path, steps=1, ema_decay=0.9))
    t.resume(latest_checkpoint(tmp_path / "run"))
    saved = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    ema = t.ema.full_state_dict(t.raw["model"])
    assert set(ema) <= set(saved) and all(torch.equal(ema[k], saved[k]) for k in ema)


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
    assert latest_checkpoint(tmp_path / "run") is None  # the stop writes no checkpoint
    assert all(torch.isfinite(v).all() for v in t.raw["model"].state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in t.raw["model"].state_dict().items())


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_nan_gradient_of_a_finite_loss_is_a_skipped_step(tmp_path, grad_clip):
    t = Trainer(cfg_for(tmp_path, steps=10, ckpt_every=1, max_nonfinite=2, **{"optim.grad_clip": grad_clip}))
    real = t.phases[0].loss_fn
    calls = {"n": 0}

    def nan_grad(mods, x, ctx, step):
        out = real(mods, x, ctx, step)
        calls["n"] += 1
        if calls["n"] >= 3:  # sqrt(0 * s) is 0, its gradient 0 * inf = NaN
            s = sum(p.sum() for p in mods["model"].parameters())
            out["loss"] = out["loss"] + (s * 0).sqrt()
            assert torch.isfinite(out["loss"])
        return out

    t.phases[0].loss_fn = nan_grad
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite"):
        t.fit()
    assert t.step == 2 and t.nonfinite_total == 2
    good = load_file(str(tmp_path / "run/checkpoints/step_00000002/model.safetensors"))
    for k, v in t.raw["model"].state_dict().items():  # the NaN gradients were never applied
        assert torch.equal(v, good[k]), k
    assert all(torch.isfinite(s).all() for s in t.ema.shadow)
    assert all(torch.isfinite(v).all() for st in t.optims["g"].state.values() for v in st.values())
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"


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


def test_each_task_carries_only_its_own_config_section():
    from hieratok.registry import model_class
    from hieratok.train.config import TASK_CONFIGS, GeneratorTrainConfig, TokenizerTrainConfig, TrainConfig, config_dict
    from hieratok.train.tasks import TASKS

    assert set(TASKS) == set(TASK_CONFIGS)
    tok, dit = load_config(), load_config(overrides={"task": "dit", "preset": "dit-tiny"})
    assert type(tok) is TokenizerTrainConfig and type(dit) is GeneratorTrainConfig
    assert not hasattr(dit, "loss") and not hasattr(dit, "gan") and not hasattr(tok, "objective")
    with pytest.raises(ValueError, match="GeneratorTrainConfig has no field 'loss'"):
        load_config(overrides={"task": "ar", "loss.kl": 1e-5})  # a tokenizer key on a generator task
    with pytest.raises(ValueError, match="TokenizerTrainConfig has no field 'sample_count'"):
        load_config(overrides={"sample_count": 4})
    with pytest.raises(ValueError, match="takes a GeneratorTrainConfig"):
        TokenizerTrainConfig(task="dit")
    with pytest.raises(ValueError, match="is not one of"):
        load_config(overrides={"task": "vqgan"})
    assert not {f.name for f in dataclasses.fields(TrainConfig)} & {"loss", "gan", "vf", "objective", "diag_every"}
    # the old task name of HieraTok loads, and a run saved under it resumes (same structure)
    old = load_config(overrides={"task": "tokenizer"})
    assert old.task == "hieratok" and type(old) is TokenizerTrainConfig
    structure = TASKS["hieratok"].resume_structure
    assert structure({"task": "tokenizer"}) == structure(config_dict(old))
    assert structure({"task": "tokenizer", "gan": {"weight": 0.5}}) != structure(config_dict(old))
    # every model family a task trains can recompute its blocks in the backward pass
    for model_type in ("hieratok", "restok", "dit", "llamagen-gpt"):  # the models of the four tasks
        assert callable(getattr(model_class(model_type), "set_grad_checkpointing", None)), model_type


def test_config_values_arrive_as_strings_and_are_converted_by_field_type(tmp_path):
    from hieratok.cli import parse_overrides

    # PyYAML reads "2e-4" (no dot) as a string, both on the command line and in files
    over = parse_overrides(["optim.lr=2e-4", "steps=1e3", "optim.betas=[0.9, 9e-1]", "fsdp=true", "data.short_side=null"])
    assert over["optim.lr"] == "2e-4"
    cfg = load_config(overrides=over)
    assert cfg.optim.lr == 2e-4 and type(cfg.optim.lr) is float and cfg.steps == 1000 and type(cfg.steps) is int
    assert cfg.optim.betas == (0.9, 0.9) and cfg.fsdp is True and cfg.data.short_side is None
    y = tmp_path / "run.yaml"
    y.write_text("optim:\n  lr: 2e-4\ngan:\n  d_betas: [0.5, 9e-1]\n")
    cfg = load_config(y)
    assert cfg.optim.lr == 2e-4 and cfg.gan.d_betas == (0.5, 0.9)
    for bad, key in ((["steps=abc"], "'steps' expects int"), (["steps=1.5"], "'steps' expects int"),
                     (["optim.lr=fast"], "'optim.lr' expects float"), (["fsdp=maybe"], "'fsdp' expects bool"),
                     (["optim.betas=[0.9]"], "'optim.betas' expects a list of 2"), (["optim=1"], "'optim' is a section"),
                     (["optim.lr.x=1"], "'optim.lr.x': 'optim.lr' is a value"),
                     (["precision=fp16"], "precision='fp16' is not one of")):
        with pytest.raises(ValueError, match=key):
            load_config(overrides=parse_overrides(bad))


def test_cli_bad_override_is_a_one_line_error(tmp_path, capsys):
    from hieratok.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), "steps=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'steps' expects int" in err


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


def test_nonfinite_discriminator_loss_skips_the_whole_step(tmp_path):
    """The generator phase must not step when the discriminator phase of the same step fails."""
    t = Trainer(cfg_for(tmp_path, steps=3, **{"gan.weight": 0.6, "gan.start_step": 0, "gan.ndf": 8}))
    real_d = t.phases[1].loss_fn

    def nan_d(mods, x, ctx, step):
        out = real_d(mods, x, ctx, step)
        out["loss"] = out["loss"] * float("nan")
        return out

    t.phases[1].loss_fn = nan_d
    batch = t.next_batch()
    before = {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in t.raw.items()}
    logs, _ = t.train_step(batch)
    assert "skipped" in logs
    for k, m in t.raw.items():
        for n, v in m.state_dict().items():
            assert torch.equal(v, before[k][n]), (k, n)
    assert t.ema.num_updates == 0 and all(not o.state for o in t.optims.values())
    t.phases[1].loss_fn = real_d  # the next try steps both phases
    logs, _ = t.train_step(batch)
    assert "skipped" not in logs and "d_loss" in logs and t.ema.num_updates == 1


def test_resume_restores_the_lecam_averages(tmp_path):
    over = {"gan.weight": 0.6, "gan.start_step": 0, "gan.ndf": 8, "gan.lecam_weight": 1e-3, "steps": 3, "ckpt_every": 2}
    t = Trainer(cfg_for(tmp_path, **over))
    t.fit(max_steps=2)
    saved = {k: v.clone() for k, v in t.task.gan.lecam.state_dict().items()}
    assert bool(saved["initialized"]) and float(saved["ema_real"]) != 0.0
    t2 = Trainer(cfg_for(tmp_path, **over))
    assert not bool(t2.task.gan.lecam.initialized)
    t2.resume(latest_checkpoint(tmp_path / "run"))
    for k, v in t2.task.gan.lecam.state_dict().items():
        assert torch.equal(v, saved[k]), k


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


def test_data_smaller_than_a_batch_is_a_clear_error(tmp_path):
    from torch.utils.data import IterableDataset

    class Three(IterableDataset):  # e.g. webdataset shards with 3 images, batch of 4
        def __iter__(self):
            return iter([(torch.zeros(3, 64, 64), 0)] * 3)

    t = Trainer(cfg_for(tmp_path, steps=2))
    t.dataset, t.sampler = Three(), None
    with pytest.raises(ValueError, match="no full batch of 4"):
        t.next_batch()


def test_cli_nonfinite_stop_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from hieratok import cli
    from hieratok.train import trainer

    def nan_step(self, batch):
        return {"skipped": torch.ones(())}, {}

    monkeypatch.setattr(trainer.Trainer, "train_step", nan_step)
    args = ["train", "--out", str(tmp_path / "run"), "--steps", "3", "max_nonfinite=2"] + [f"{k}={v}" for k, v in FAST.items()]
    assert cli.main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 consecutive non-finite" in err


def test_cli_train_on_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    from hieratok.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "empty" in err


def test_restok_task_trains_with_its_gan_phase_resumes_and_loads(tmp_path):
    from hieratok.registry import TOKENIZERS, load_model

    over = {"progress": False, "tensorboard": False, "image_every": 0, "log_every": 1, "batch_size": 2,
            "data.samples_per_epoch": 8, "loss.perceptual": 0.0, "gan.weight": 0.5, "gan.start_step": 1,
            "gan.ndf": 8, "steps": 3, "ckpt_every": 2}
    cfg = load_config(overrides={"task": "restok", "out_dir": str(tmp_path / "run"), **over})
    t = Trainer(cfg)
    model = t.raw["model"]
    assert model.config.encoder_alignment is False and model.encoder_align is None  # no foundation features
    hist = t.fit(max_steps=2)
    h0, h1 = hist[0], hist[1]
    # the release's objective: MSE of [0, 1] images + codebook + beta * commitment (no perceptual, no GAN yet)
    assert h0["loss"] == pytest.approx(h0["l2"] + h0["vq"], rel=1e-5)
    assert h0["vq"] == pytest.approx(h0["codebook"] + 0.25 * h0["commitment"], rel=1e-5)
    assert "d_d_loss" not in h0 and "d_d_loss" in h1 and "g_loss" in h1
    t2 = Trainer(cfg)
    t2.fit(resume="auto")
    assert t2.step == 3
    tok, info = load_model(tmp_path / "run", expect=TOKENIZERS)
    assert info["model_type"] == "restok" and info["weights"] == "ema"
    x = torch.rand(2, 3, model.config.image_size, model.config.image_size) * 2 - 1
    with torch.no_grad():
        codes = tok.tokenize(x)
        assert codes.shape == (2, model.config.num_latent_tokens) and codes.dtype == torch.long
        assert tok.detokenize(codes).shape == x.shape


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_trainer_keeps_freed_memory_unless_told_not_to(tmp_path, monkeypatch, keep):
    import hieratok.train.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or True)
    Trainer(cfg_for(tmp_path, keep_freed_memory=keep))
    assert len(calls) == int(keep)
