"""ImageFolderDataset layouts, unreadable-file skipping, build_dataset dispatch."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hieratok.data import (
    EmbeddedPhotos,
    ImageFolderDataset,
    WebDatasetShards,
    build_dataset,
    build_transform,
    collate_drop_none,
)


def _write(path, seed=0, size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_class_folders_labels_and_extensions(tmp_path):
    _write(tmp_path / "zebra" / "a.PNG", 1, fmt="PNG")
    _write(tmp_path / "zebra" / "nested" / "b.jpeg", 2, fmt="JPEG")
    _write(tmp_path / "ant" / "c.Tiff", 3, fmt="TIFF")
    _write(tmp_path / "ant" / "d.BMP", 4, fmt="BMP")
    _write(tmp_path / "ant" / "e.webp", 5, fmt="WEBP")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / ".hidden.png").write_bytes(b"x")
    ds = ImageFolderDataset(tmp_path)
    assert ds.layout == "classes" and ds.classes == ["ant", "zebra"] and ds.num_classes == 2
    names = [p.split("/")[-1] for p, _ in ds.samples]
    assert names == ["c.Tiff", "d.BMP", "e.webp", "a.PNG", "b.jpeg"]
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1]
    x, label = ds[3]
    assert label == 1 and x.shape == (3, 10, 12) and x.dtype == torch.float32


def test_flat_folder_is_unlabelled(tmp_path):
    arr = _write(tmp_path / "one.jpg", 0, fmt="PNG")  # wrong extension for the content is fine
    _write(tmp_path / "two.GIF", 1, fmt="GIF")
    ds = ImageFolderDataset(tmp_path)
    assert ds.layout == "flat" and ds.num_classes == 0 and len(ds) == 2
    x, label = ds[0]
    assert label == -1
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(arr).permute(2, 0, 1))


def test_empty_or_missing_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="empty_dir"):
        ImageFolderDataset(tmp_path / "empty_dir")  # missing
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        ImageFolderDataset(tmp_path / "empty_dir")
    (tmp_path / "empty_dir" / "readme.md").write_text("hi")
    (tmp_path / "empty_dir" / "cls").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolderDataset(tmp_path / "empty_dir")


def test_corrupt_files_are_skipped_counted_and_named(tmp_path, caplog):
    for i in range(3):
        _write(tmp_path / f"good{i}.png", i, fmt="PNG")
    _truncated_jpeg(tmp_path / "good0_truncated.jpg")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    ds = ImageFolderDataset(tmp_path, build_transform(8, train=False))
    assert len(ds) == 5
    with caplog.at_level(logging.WARNING, logger="hieratok.data.datasets"):
        items = [ds[i] for i in range(len(ds))]
        loader_items = [b for b in DataLoader(ds, batch_size=5)]
    assert all(x.shape == (3, 8, 8) for x, _ in items)
    assert ds.num_skipped == 2
    assert sorted(p.split("/")[-1] for p in ds.skipped_files) == ["good0_truncated.jpg", "noise.png"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "good0_truncated.jpg" in logged and "noise.png" in logged
    assert loader_items[0][0].shape == (5, 3, 8, 8)

    # on_error="none": the loader drops the unreadable items instead of repeating neighbours
    ds_none = ImageFolderDataset(tmp_path, build_transform(8, train=False), on_error="none")
    batch = next(iter(DataLoader(ds_none, batch_size=5, collate_fn=collate_drop_none)))
    assert batch[0].shape == (3, 3, 8, 8) and ds_none.num_skipped == 2


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    for i in range(2):
        _write(tmp_path / f"{i}.png", i, size=(40, 30), fmt="PNG")
    t = build_transform(16, train=True, random_resized_crop_scale=(0.1, 0.5))
    a, b = ImageFolderDataset(tmp_path, t, seed=3), ImageFolderDataset(tmp_path, t, seed=3)
    assert torch.equal(a[1][0], b[1][0])
    b.set_epoch(1)
    assert not torch.equal(a[1][0], b[1][0])
    assert not torch.equal(a[1][0], ImageFolderDataset(tmp_path, t, seed=4)[1][0])


def test_build_dataset_dispatch(tmp_path):
    _write(tmp_path / "imgs" / "a.png", 0, size=(40, 30), fmt="PNG")
    ds = build_dataset(str(tmp_path / "imgs"), "val", 16)
    assert isinstance(ds, ImageFolderDataset) and ds[0][0].shape == (3, 16, 16)
    assert isinstance(build_dataset(None, "train", 32, length=5), EmbeddedPhotos)
    held = build_dataset(None, "eval", 32)
    assert isinstance(held, EmbeddedPhotos) and held.split == "heldout"
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s-0.tar")) as sink:
        sink.write({"__key__": "k0", "png": (tmp_path / "imgs" / "a.png").read_bytes(), "cls": b"3"})
    for spec in [str(tmp_path / "s-0.tar"), str(tmp_path / "s-*.tar"), str(tmp_path / "s-{0..0}.tar")]:
        shards = build_dataset(spec, "val", 16)
        assert isinstance(shards, WebDatasetShards)
        (x, label), = list(shards)
        assert x.shape == (3, 16, 16) and label == 3
    with pytest.raises(ValueError, match="neither a directory"):
        build_dataset(str(tmp_path / "nothing_here"), "train", 16)
    with pytest.raises(ValueError, match="split"):
        build_dataset(None, "training", 16)


def test_fifo_and_other_special_files_are_not_listed(tmp_path):
    import os

    _write(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")  # a reader would block in open() forever
    ds = ImageFolderDataset(tmp_path, layout="flat")
    assert [os.path.basename(f) for f, _ in ds.samples] == ["a.png"]


def test_symlink_loops_and_repeated_links_list_each_image_once(tmp_path):
    import os

    for i in range(3):
        _write(tmp_path / "root" / "sub" / f"{i}.png", seed=i)
    os.symlink(tmp_path / "root", tmp_path / "root" / "sub" / "loop")  # a cycle
    os.symlink(tmp_path / "root" / "sub", tmp_path / "root" / "again")  # a second way into sub
    os.symlink(tmp_path / "missing", tmp_path / "root" / "dangling.png")
    ds = ImageFolderDataset(tmp_path / "root", layout="flat")
    assert sorted(os.path.basename(f) for f, _ in ds.samples) == ["0.png", "1.png", "2.png"]


def test_pipe_data_specs_need_the_command_line_opt_in(tmp_path):
    from hieratok.data import expand_shard_urls

    marker = tmp_path / "ran"
    spec = f"pipe:touch {marker}; cat /dev/null"
    with pytest.raises(ValueError, match="runs a shell command.*--allow-code-execution"):
        build_dataset(spec, "train", 16)
    with pytest.raises(ValueError, match="runs a shell command"):
        expand_shard_urls(f"{spec}::{tmp_path}/x.tar")
    assert expand_shard_urls(spec, allow_pipe=True) == [spec]
    assert not marker.exists()
