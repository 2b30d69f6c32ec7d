"""The ResTok training recipe of ``hieratok train --task restok``: the release's grad clip and
warm-up, and the foundation-feature alignment terms switched on from the command line."""

import csv
import json

import pytest

from hieratok.checkpoint import latest_checkpoint
from hieratok.train import load_config, lr_at

QUIET = {"progress": False, "tensorboard": False, "image_every": 0, "log_every": 1, "loss.perceptual": 0.0}


def test_restok_recipe_clips_at_10_and_warms_up_for_5k_steps():
    from hieratok.train.tasks import build_task

    cfg = load_config(overrides={"task": "restok", "steps": 20_000, **QUIET})
    assert cfg.optim.grad_clip == 10.0 and cfg.optim.warmup_steps == 5000
    assert (cfg.vf.margin_cos, cfg.vf.adaptive) == (0.25, False)  # the release's alignment margin, constant weight
    (g,) = build_task(cfg).phases()
    lrs = [lr_at(s, cfg.steps, g.lr, g.end_lr, g.warmup_ratio) for s in (0, 2499, 4999, 5000)]
    assert lrs[0] == pytest.approx(1e-4 / 5000) and lrs[1] == pytest.approx(0.5e-4)
    assert lrs[2] == pytest.approx(1e-4) and lrs[3] == pytest.approx(1e-4)
    # unset, the ratio applies again
    cfg = load_config(overrides={"task": "restok", "steps": 100, "optim.warmup_steps": None, **QUIET})
    assert build_task(cfg).phases()[0].warmup_ratio == cfg.optim.warmup_ratio
    with pytest.raises(ValueError, match="warmup_steps"):
        load_config(overrides={"task": "restok", "optim.warmup_steps": -1})
    with pytest.raises(ValueError, match="restok"):  # the other tasks read warmup_ratio only
        load_config(overrides={"optim.warmup_steps": 100})


def test_train_restok_with_alignment_from_the_cli(tmp_path):
    from hieratok.cli import main
    from hieratok.tokenizers.restok import ResTok
    from hieratok.train.tasks import build_task

    out = tmp_path / "run"
    args = ["train", "--task", "restok", "--out", str(out), "--steps", "1", "batch_size=2", "data.samples_per_epoch=2",
            "ckpt_every=0", "vf.weight=1", "vf.encoder=effnet-lite0", *(f"{k}={v}" for k, v in QUIET.items())]
    assert main(args) == 0
    with open(out / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["align_enc"]) > 0 and float(row["align_dec"]) > 0
    total = sum(float(row[k]) for k in ("l2", "vq", "align_enc", "align_dec"))
    assert float(row["loss"]) == pytest.approx(total, rel=1e-5)  # weight vf.weight = 1 on both terms
    assert float(row["lr"]) == pytest.approx(1e-4 / 5000)  # step 1 of the 5k-step warm-up
    ckpt = latest_checkpoint(out)
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["encoder_alignment"] and saved["decoder_alignment"] and saved["alignment_dim"] == 112  # EffNet block 10
    assert ResTok.from_pretrained(ckpt).encoder_align is not None
    with pytest.raises(ValueError, match="adaptive"):  # the release weights alignment by a constant
        build_task(load_config(overrides={"task": "restok", "vf.weight": 1.0, "vf.adaptive": True, **QUIET}))
