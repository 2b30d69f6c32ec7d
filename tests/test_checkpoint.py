"""Checkpoint directories are replaced atomically."""

import shutil

import pytest
import torch

from hieratok import checkpoint
from hieratok.checkpoint import STATE_NAME, latest_checkpoint, load_checkpoint_files, save_checkpoint


def _save(run, step, value):
    def write_model(d):
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"weights")

    return save_checkpoint(run, step, model_dir_writer=write_model, weights={"ema": {"w": torch.full((2,), value)}},
                           optim_tensors={"x": torch.zeros(1)}, state={"value": value}, keep_last=3)


def test_resaving_a_step_killed_while_deleting_the_old_one(tmp_path, monkeypatch):
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    real = shutil.rmtree

    def killed(path, *a, **k):  # deletes part of the directory, then the process dies
        (path / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, 3.0)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_00000002" and (ckpt / "model.safetensors").is_file()
    assert load_checkpoint_files(ckpt)[0] == {"value": 3.0}  # the new save, complete
    _save(tmp_path, 3, 4.0)  # the next save clears what the killed one left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step_00000001", "step_00000002", "step_00000003"]
    assert all((p / STATE_NAME).is_file() for p in (tmp_path / "checkpoints").iterdir())
