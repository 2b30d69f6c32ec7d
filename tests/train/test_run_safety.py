"""Runs never destroy or poison what is on disk: existing runs, checkpoints after a blow-up, a full
disk, a damaged latest checkpoint; configs are validated before anything is built."""

import errno
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from hieratok.checkpoint import complete_checkpoints, latest_checkpoint
from hieratok.cli import main
from hieratok.train import NonFiniteLossError, Trainer, load_config

FAST = {"adapt_threads": False,  # fixed threads: trajectories are compared bit for bit
        "model.encoder_depth": 1, "model.decoder_depth": 1, "progress": False, "tensorboard": False,
        "image_every": 0, "log_every": 1, "batch_size": 2, "data.samples_per_epoch": 8, "loss.perceptual": 0.0,
        "diag_every": 0}


def cfg_for(tmp_path, name="run", **kw):
    return load_config(overrides={**FAST, "out_dir": str(tmp_path / name), **kw})


def test_a_second_run_into_the_same_folder_is_refused_unless_resume_or_overwrite(tmp_path):
    Trainer(cfg_for(tmp_path, steps=4, ckpt_every=2)).fit()
    run = tmp_path / "run"
    log_before = (run / "metrics.csv").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume auto.*--overwrite"):
        Trainer(cfg_for(tmp_path, steps=2, ckpt_every=1)).fit()
    assert (run / "metrics.csv").read_text() == log_before  # nothing touched
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000004", "step_00000002"]
    # the CLI refuses before building anything, with the same one line
    assert main(["train", "--out", str(run), "--steps", "2", *[f"{k}={v}" for k, v in FAST.items()]]) == 2
    # --overwrite replaces the old run: its later checkpoints do not outlive (or evict) the new run's
    Trainer(cfg_for(tmp_path, steps=2, ckpt_every=1), overwrite=True).fit()
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000002", "step_00000001"]
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + 2 steps


@pytest.mark.parametrize("key,value,match", [
    ("optim.lr", "inf", "'optim.lr' must be a finite number"),
    ("optim.end_lr", "nan", "'optim.end_lr' must be a finite number"),
    ("optim.warmup_ratio", "nan", "'optim.warmup_ratio' must be a finite number"),
    ("loss.kl", "-inf", "'loss.kl' must be a finite number"),
    ("log_every", 0, "'log_every' must be an integer >= 1"),
    ("steps", 0, "'steps' must be an integer >= 1"),
    ("optim.lr", 0, "lr > 0"),
])
def test_config_values_are_checked_before_anything_runs(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        cfg_for(tmp_path, **{key: value})


def test_weights_that_blow_up_are_never_saved(tmp_path):
    t = Trainer(cfg_for(tmp_path, steps=6, ckpt_every=2))
    t.fit(max_steps=2)
    good = latest_checkpoint(tmp_path / "run")
    assert good.name == "step_00000002"
    with torch.no_grad():  # what an infinite learning rate does to the weights after a finite step
        next(t.raw["model"].parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=f"consecutive non-finite.*{re.escape(str(good))}"):
        t.fit()
    assert latest_checkpoint(tmp_path / "run") == good
    assert all(torch.isfinite(v).all() for v in load_file(str(good / "model.safetensors")).values())


def test_save_refuses_non_finite_weights(tmp_path):
    t = Trainer(cfg_for(tmp_path, steps=2, ckpt_every=0))
    t.fit(max_steps=1)
    with torch.no_grad():
        next(t.raw["model"].parameters())[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="weights became non-finite.*no checkpoint written"):
        t.save()
    assert latest_checkpoint(tmp_path / "run") is None


def test_resume_falls_back_from_a_damaged_latest_checkpoint(tmp_path, caplog):
    Trainer(cfg_for(tmp_path, steps=4, ckpt_every=2, keep_last=3)).fit()
    run = tmp_path / "run"
    bad = latest_checkpoint(run)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as by a full disk
    t = Trainer(cfg_for(tmp_path, steps=4, ckpt_every=2, keep_last=3))
    t.fit(resume="auto", max_steps=0)
    assert t.step == 2 and "step_00000004 is damaged (model.safetensors" in caplog.text
    with pytest.raises(ValueError, match="is damaged"):
        Trainer(cfg_for(tmp_path, steps=4)).fit(resume=str(bad))


def test_a_full_disk_leaves_no_temporary_checkpoint(tmp_path, monkeypatch):
    from hieratok import checkpoint

    t = Trainer(cfg_for(tmp_path, steps=2, ckpt_every=0))
    t.fit(max_steps=1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match="No space left") as e:
        t.save()
    assert e.value.filename == str(tmp_path / "run" / "checkpoints")
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
