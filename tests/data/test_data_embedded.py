"""The built-in photographs: offline availability, split, determinism, values."""

import numpy as np
import pytest
import torch

from hieratok.data import EMBEDDED_PHOTOS, EmbeddedPhotos, load_rgb, pil_to_tensor


def test_every_listed_photo_is_installed_and_decodes():
    assert len(EMBEDDED_PHOTOS) >= 12
    for photo in EMBEDDED_PHOTOS:
        path = photo.path()
        assert path is not None, f"{photo.name} missing from {photo.package}"
        img = load_rgb(path)
        assert img.mode == "RGB" and min(img.size) >= 256, photo.name


def test_train_and_heldout_are_disjoint_by_photo():
    train, held = EmbeddedPhotos("train", 32, length=300), EmbeddedPhotos("heldout", 32)
    assert set(train.names).isdisjoint(held.names)
    assert len(held.names) >= 3 and len(train.names) >= 9
    assert set(held.names) == {"chelsea", "rocket", "flower"}
    # the train split actually draws every train photo and nothing else
    labels = {train[i][1] for i in range(len(train))}
    assert labels == set(range(len(train.names)))
    # a train sample is an exact (possibly mirrored) window of the train photo it names
    for i in range(3):
        x, k = train[i]
        crop = ((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        photo = np.asarray(train.photo(k))
        assert _find_window(photo, crop) or _find_window(photo, crop[:, ::-1])


def _find_window(photo: np.ndarray, crop: np.ndarray) -> bool:
    n = crop.shape[0]
    for y, x in np.argwhere(np.all(photo == crop[0, 0], axis=-1)):
        if np.array_equal(photo[y : y + n, x : x + n], crop):
            return True
    return False


def test_train_crop_is_a_pure_function_of_seed_epoch_index():
    a = EmbeddedPhotos("train", 24, length=50, seed=7)
    b = EmbeddedPhotos("train", 24, length=50, seed=7)
    order = [a[i][0] for i in (3, 11, 40)]
    reverse = [b[i][0] for i in (40, 11, 3)][::-1]
    assert all(torch.equal(p, q) for p, q in zip(order, reverse))
    b.set_epoch(1)
    assert not torch.equal(a[3][0], b[3][0])
    b.set_epoch(0)
    assert torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a[3][0], EmbeddedPhotos("train", 24, length=50, seed=8)[3][0])
    assert not torch.equal(a[3][0], a[4][0])
    with pytest.raises(IndexError):
        a[50]


def test_values_shapes_and_grey_photos():
    ds = EmbeddedPhotos("train", 40, length=64, seed=0)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    assert xs.shape == (64, 3, 40, 40) and xs.dtype == torch.float32
    assert xs.min() >= -1.0 and xs.max() <= 1.0 and xs.std() > 0.1
    grey = ds.names.index("camera")
    grey_items = [ds[i][0] for i in range(len(ds)) if ds[i][1] == grey]
    assert grey_items and all(torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]) for x in grey_items)


def test_heldout_crops_are_fixed_positions():
    held = EmbeddedPhotos("heldout", 64, crops_per_photo=3)
    assert len(held) == 3 * len(held.names)
    for index in (0, 4, 8):
        k, j = divmod(index, 3)
        photo = held.photo(k)
        top = (2 * j + 1) * (photo.height - 64) // 6
        left = (2 * j + 1) * (photo.width - 64) // 6
        x, label = held[index]
        assert label == k
        assert torch.equal(x, pil_to_tensor(photo.crop((left, top, left + 64, top + 64))))
    assert torch.equal(held[1][0], EmbeddedPhotos("heldout", 64, crops_per_photo=3)[1][0])
    # the middle crop of an odd count is the ADM centre crop position
    photo = held.photo(0)
    top, left = (photo.height - 64) // 2, (photo.width - 64) // 2
    assert torch.equal(held[1][0], pil_to_tensor(photo.crop((left, top, left + 64, top + 64))))


def test_small_photos_are_upscaled_and_short_side_option():
    big = EmbeddedPhotos("heldout", 512, crops_per_photo=1)  # chelsea is 451x300
    assert big[0][0].shape == (3, 512, 512)
    small = EmbeddedPhotos("train", 32, length=4, short_side=64)
    assert all(min(small.photo(k).size) == 64 for k in range(len(small.names)))
    with pytest.raises(ValueError):
        EmbeddedPhotos("heldout", 32, length=10)
    with pytest.raises(ValueError):
        EmbeddedPhotos("validation", 32)
