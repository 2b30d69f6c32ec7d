"""Aspect-ratio buckets: one shape per batch, deterministic and resumable bucket draws, rectangular
crops, and a training run that records the sizes it saw."""

import json
import random

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from hieratok.checkpoint import latest_checkpoint
from hieratok.data import BucketBatchSampler, ResumableDistributedSampler, build_bucketed_dataset, collate_drop_none
from hieratok.data.transforms import RandomResizedCrop, bucket_transform, cover_crop, random_crop
from hieratok.train import Trainer, load_config

SIZES = [(32, 32), (32, 48), (48, 32)]


def test_rectangular_crops():
    img = Image.new("RGB", (100, 60))
    assert random_crop(img, (40, 80), random.Random(0)).size == (80, 40)  # PIL: (width, height)
    assert random_crop(img, (80, 40), random.Random(0)).size == (40, 80)  # upscaled to cover 80 rows
    assert cover_crop(img, (30, 90)).size == (90, 30)
    assert RandomResizedCrop((24, 48))(img, random.Random(1)).size == (48, 24)
    t = bucket_transform((32, 64), (0.5, 1.0))
    r = RandomResizedCrop((32, 64), (0.5, 1.0), (1.5, 8 / 3))
    assert t.transforms[0].ratio == r.ratio  # aspect ratios within 3/4 .. 4/3 of the bucket's 2:1
    assert t(img, random.Random(2)).size == (64, 32)


def test_every_batch_is_one_bucket_and_draws_are_deterministic():
    ds = build_bucketed_dataset(None, SIZES, length=40, seed=0)
    sampler = ResumableDistributedSampler(ds, 1, 0, shuffle=True, seed=0, drop_last=True)
    bs = BucketBatchSampler(sampler, 4, len(SIZES), seed=3)
    batches = [b for b, _ in DataLoader(ds, batch_sampler=bs, collate_fn=collate_drop_none)]
    assert len(batches) == 10
    shapes = [tuple(b.shape[-2:]) for b in batches]
    assert set(shapes) == set(SIZES)  # 10 draws over 3 buckets with this seed cover all three
    assert shapes == [SIZES[bs.bucket_of(0, j)] for j in range(10)]
    # resume after 6 batches: the remaining batches get the buckets of the uninterrupted epoch
    sampler.advance(24)
    sampler.load_state_dict(sampler.state_dict())
    rest = [tuple(b.shape[-2:]) for b, _ in DataLoader(ds, batch_sampler=bs, collate_fn=collate_drop_none)]
    assert rest == shapes[6:]


def test_bucket_weights_follow_their_frequencies():
    bs = BucketBatchSampler(ResumableDistributedSampler(10, 1, 0), 2, 3, weights=[1, 0, 3])
    draws = [bs.bucket_of(0, j) for j in range(4000)]
    assert draws.count(1) == 0
    assert abs(draws.count(2) / 4000 - 0.75) < 4 * (0.75 * 0.25 / 4000) ** 0.5  # 4 sigma


def test_shards_cannot_be_bucketed():
    with pytest.raises(ValueError, match="data.buckets needs an image folder"):
        build_bucketed_dataset("/data/train-{000..009}.tar", SIZES)


def test_bucketed_training_records_the_sizes_seen(tmp_path):
    buckets = [[64, 64], [64, 96], [96, 64]]
    cfg = load_config(overrides={
        "adapt_threads": False, "model.encoder_depth": 1, "model.decoder_depth": 1, "progress": False,
        "tensorboard": False, "image_every": 0, "log_every": 1, "batch_size": 2, "data.samples_per_epoch": 16,
        "loss.perceptual": 0.0, "diag_every": 0, "steps": 4, "ckpt_every": 4, "data.buckets": buckets,
        "out_dir": str(tmp_path / "run")})
    Trainer(cfg).fit()
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    seen = state["image_sizes_seen"]
    assert sum(seen.values()) == 8 and set(seen) <= {"64x64", "64x96", "96x64"}
    assert state["train_config"]["data"]["buckets"] == buckets
    with pytest.raises(ValueError, match="60x64 does not work"):
        Trainer(load_config(overrides={"data.buckets": [[60, 64]], "out_dir": str(tmp_path / "bad"),
                                       "progress": False, "tensorboard": False})).fit()


def test_bucket_config_errors():
    with pytest.raises(ValueError, match=r"data.buckets\[0\]' expects a list of 2 values"):
        load_config(overrides={"data.buckets": [[64]]})
    with pytest.raises(ValueError, match="data.buckets must be a list of"):
        load_config(overrides={"data.buckets": [[64, 0]]})
    assert load_config(overrides={"data.buckets": [[64, 96], [96, 64]]}).data.buckets == ((64, 96), (96, 64))
