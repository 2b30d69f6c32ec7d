"""webdataset shards: round trip, rank/worker splitting, corrupt members skipped."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hieratok.data import WebDatasetShards, build_transform, expand_shard_urls


def _png(seed: int, size=(10, 8)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path, members: list[tuple[str, bytes]]) -> None:
    """Plain tarfile writer (independent of webdataset's own writer)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """Two shards of 4 samples; sample id = its class; shard 1 holds one corrupt image (id 6)."""
    for s in range(2):
        members = []
        for i in range(4):
            sid = 4 * s + i
            image = b"\x89PNG not really" + bytes(50) if sid == 6 else _png(sid)
            members += [(f"sample{sid:03d}.png", image), (f"sample{sid:03d}.cls", str(sid).encode())]
        _write_shard(tmp_path / f"shard-{s:06d}.tar", members)
    return tmp_path


def _labels(ds) -> list[int]:
    return [label for _, label in ds]


def test_two_ranks_see_disjoint_samples_covering_everything(shards, caplog):
    pattern = str(shards / "shard-{000000..000001}.tar")
    with caplog.at_level(logging.WARNING, logger="hieratok.data.datasets"):
        per_rank = [WebDatasetShards(pattern, rank=r, world_size=2, seed=1) for r in range(2)]
        seen = [_labels(ds) for ds in per_rank]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == [0, 1, 2, 3, 4, 5, 7]
    assert sum(ds.num_skipped for ds in per_rank) == 1
    assert any("sample006" in r.getMessage() for r in caplog.records)
    # shard order is reshuffled per epoch but stays a partition
    for ds in per_rank:
        ds.set_epoch(5)
    again = [_labels(ds) for ds in per_rank]
    assert sorted(again[0] + again[1]) == [0, 1, 2, 3, 4, 5, 7]


def test_dataloader_workers_split_shards(shards):
    ds = WebDatasetShards(str(shards / "shard-*.tar"), build_transform(8, train=False))
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    items = list(loader)
    assert sorted(label for _, label in items) == [0, 1, 2, 3, 4, 5, 7]
    assert all(x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1 for x, _ in items)


def test_images_round_trip_and_json_labels(tmp_path):
    arr = np.arange(10 * 8 * 3, dtype=np.uint8).reshape(8, 10, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    _write_shard(tmp_path / "a.tar", [
        ("x1.png", buf.getvalue()), ("x1.json", json.dumps({"label": 12}).encode()),
        ("x2.JPG", _png(2)),  # upper-case extension, no label
    ])
    (x1, l1), (x2, l2) = list(WebDatasetShards(tmp_path / "a.tar", shuffle_shards=False))
    assert (l1, l2) == (12, -1)
    assert torch.equal(((x1 + 1) * 127.5).round().byte(), torch.from_numpy(arr).permute(2, 0, 1))


def test_truncated_shard_and_augmentation_determinism(tmp_path, caplog):
    _write_shard(tmp_path / "t.tar", [(f"s{i}.png", _png(i, (40, 40))) for i in range(6)])
    raw = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(raw[: len(raw) * 2 // 3])
    t = build_transform(16, train=True, random_resized_crop_scale=(0.2, 0.6))
    ds = WebDatasetShards(tmp_path / "t.tar", t, seed=0)
    with caplog.at_level(logging.WARNING, logger="hieratok.data.datasets"):
        first = list(ds)
    assert 1 <= len(first) < 6 and ds.num_skipped >= 1
    second = list(ds)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    ds.set_epoch(1)
    assert not torch.equal(first[0][0], list(ds)[0][0])


def test_shard_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        expand_shard_urls(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="does not exist"):
        expand_shard_urls(str(tmp_path / "x-{0..1}.tar"))
    _write_shard(tmp_path / "only.tar", [("a.png", _png(0))])
    with pytest.raises(ValueError, match="cannot be split"):
        WebDatasetShards(tmp_path / "only.tar", rank=0, world_size=2)
