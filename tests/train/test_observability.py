"""What a training run shows: codebook usage / perplexity of VQ training, reconstruction grids in
TensorBoard and wandb, a resumed run continuing its wandb run, data-loading workers by device.

wandb is not installed here: a fake module in ``sys.modules`` records what the trainer asks of it.
"""

import csv
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from hieratok.train import Trainer, load_config
from hieratok.train.trainer import check_run_dir, default_num_workers


class _FakeRun:
    def __init__(self, **kw):
        self.init_kwargs = kw
        self.id = kw.get("id") or "run-0001"
        self.name, self.project = kw["name"], kw["project"]
        self.entity = kw.get("entity") or "default-entity"
        self.url = f"https://wandb.invalid/{self.entity}/{self.project}/runs/{self.id}"
        self.logged, self.finished = [], False

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.runs = []
    mod.init = lambda **kw: mod.runs.append(_FakeRun(**kw)) or mod.runs[-1]
    mod.Image = type("Image", (), {"__init__": lambda self, path: setattr(self, "path", path)})
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_codes_identical_for_every_image_are_reported_once(tmp_path, caplog):
    over = {"task": "restok", "out_dir": str(tmp_path / "run"), "progress": False, "adapt_threads": False,
            "image_every": 0, "log_every": 1, "diag_every": 0, "batch_size": 2, "data.samples_per_epoch": 8,
            "loss.perceptual": 0.0, "steps": 3, "ckpt_every": 0}
    t = Trainer(load_config(overrides=over))

    def collapse(m, args, out):  # a collapsed codebook: every image gets code 3 at every position
        out["indices"] = torch.full_like(out["indices"], 3)

    t.raw["model"].register_forward_hook(collapse)
    with caplog.at_level("WARNING", logger="hieratok.train.tasks"):
        t.fit()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["codes_shared"]) for r in rows] == [1.0, 1.0, 1.0]
    warned = [r.getMessage() for r in caplog.records if "same code sequence" in r.getMessage()]
    assert len(warned) == 1 and "1 codes in use" in warned[0] and "commitment_beta" in warned[0]


def test_vq_codebook_stats_grids_and_wandb_resume(tmp_path, fake_wandb):
    over = {"task": "restok", "out_dir": str(tmp_path / "run"), "progress": False, "adapt_threads": False,
            "tensorboard": True, "wandb": True, "wandb_entity": "lab", "image_every": 2, "log_every": 2,
            "diag_every": 0, "batch_size": 2, "data.samples_per_epoch": 8, "loss.perceptual": 0.0, "steps": 2,
            "ckpt_every": 2}
    t = Trainer(load_config(overrides=over))
    seen = []  # the indices of every training forward, recorded independently of the task
    t.raw["model"].register_forward_hook(lambda m, args, out: seen.append(out["indices"].detach().clone()))
    t.fit()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2"]
    k = t.raw["model"].config.codebook_size
    counts = np.bincount(torch.cat(seen).flatten().numpy(), minlength=k).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    assert len(seen) == 2 and float(rows[0]["codebook_usage"]) == pytest.approx((counts > 0).sum() / k, rel=1e-12)
    assert float(rows[0]["codebook_perplexity"]) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    shared = [(b == b[:1]).all(0).double().mean().item() for b in seen]  # positions common to the batch's images
    assert float(rows[0]["codes_shared"]) == pytest.approx(sum(shared) / len(shared), abs=1e-7)
    # the reconstruction grid: in images/, in TensorBoard, in wandb
    grid = tmp_path / "run" / "images" / "recon_00000002.png"
    assert grid.is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run" / "tb"))
    ea.Reload()
    assert "recon" in ea.Tags()["images"] and "codebook_perplexity" in ea.Tags()["scalars"]
    run = fake_wandb.runs[0]
    assert run.init_kwargs["resume"] == "allow" and run.init_kwargs["id"] is None
    assert run.init_kwargs["name"] == "run" and run.init_kwargs["entity"] == "lab" and run.finished
    images = [(s, d["recon"].path) for s, d in run.logged if "recon" in d]
    assert images == [(2, str(grid))]
    assert any("codebook_usage" in d for _, d in run.logged)
    saved = json.loads((tmp_path / "run" / "wandb.json").read_text())
    assert saved == {"id": "run-0001", "name": "run", "entity": "lab", "project": "hieratok", "url": run.url}
    # resumed (even with another wandb_name in the config): the same wandb run continues
    Trainer(load_config(overrides={**over, "steps": 3, "wandb_name": "other"})).fit(resume="auto")
    again = fake_wandb.runs[1].init_kwargs
    assert (again["id"], again["name"], again["entity"], again["resume"]) == ("run-0001", "run", "lab", "allow")
    assert json.loads((tmp_path / "run" / "wandb.json").read_text()) == saved
    # --overwrite removes the run's wandb identity with the rest of the run: a new run gets a new wandb run
    check_run_dir(tmp_path / "run", None, overwrite=True)
    assert not (tmp_path / "run" / "wandb.json").exists()


def test_default_num_workers(monkeypatch):
    assert load_config(overrides={}).data.num_workers is None  # resolved by device when the loader is built
    assert default_num_workers(torch.device("cpu")) == 0  # CPU training keeps its cores for the math
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers(cuda) == 8  # min(8, 32 - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers(cuda) == 3  # 4 CPUs per rank, one for the rank itself
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers(cuda) == 0
