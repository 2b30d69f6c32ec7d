"""Image datasets: class folders, webdataset shards, and photographs shipped inside packages.

Every dataset yields ``(x_CHW, label)``: a float32 tensor (3, H, W) in [-1, 1] (when the
transform returns a PIL image) and an int class label, -1 when the data has no labels.

Randomness: a dataset's transform receives a ``random.Random`` seeded from
(``seed``, epoch, sample identity), so the augmentation of a sample is a pure function of those
and a resumed run repeats it exactly. Call ``set_epoch`` before each epoch; with
``persistent_workers=True`` DataLoader workers keep their own copy of the dataset, so create the
loader without persistent workers (or rebuild it) when the epoch must reach the augmentations.

Unreadable images never stop training. They are logged (a warning naming the file), counted in
``num_skipped`` and skipped: :class:`ImageFolderDataset` returns the next readable image (or
``None`` with ``on_error="none"``, for :func:`collate_drop_none`) and
:class:`WebDatasetShards` drops the sample through webdataset's handler hook. DataLoader workers
are separate processes, so each keeps its own count and the main process's ``num_skipped`` only
covers reads made there; the per-file warnings, emitted in every worker, are the complete record.
"""

from __future__ import annotations

import copy
import functools
import glob
import importlib.util
import itertools
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from hieratok._optional import install_hint, require
from hieratok.data.images import UnreadableImageError, load_rgb, pil_to_tensor
from hieratok.data.transforms import (
    CenterCrop,
    Compose,
    RandomHorizontalFlip,
    RandomResizedCrop,
    accepts_rng,
    bucket_transform,
    check_hw,
    random_crop,
    resize_short_side,
    upscale_to_cover,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNLABELED",
    "EmbeddedPhoto",
    "EMBEDDED_PHOTOS",
    "ImageFolderDataset",
    "WebDatasetShards",
    "EmbeddedPhotos",
    "build_transform",
    "build_dataset",
    "BucketedDataset",
    "build_bucketed_dataset",
    "collate_drop_none",
    "expand_shard_urls",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
)  # fmt: skip
UNLABELED = -1  # label of images that come without a class

Transform = Callable[..., Any]


def _item_rng(seed: int, epoch: int, ident: Union[int, str]) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across processes and runs
    # (unlike hash()), so the stream depends on (seed, epoch, ident) only.
    return random.Random(f"hieratok/{seed}/{epoch}/{ident}")


def _apply(transform: Optional[Transform], takes_rng: bool, img: Image.Image, rng: random.Random) -> Any:
    out = img if transform is None else (transform(img, rng) if takes_rng else transform(img))
    return pil_to_tensor(out) if isinstance(out, Image.Image) else out


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(a) for a in exc.args) if exc.args else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def collate_drop_none(batch: list[Any]) -> Any:
    """``default_collate`` after dropping ``None`` items (skipped unreadable images).

    Returns ``None`` when every item of the batch was skipped; the training loop should skip it.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)


# --------------------------------------------------------------------------------------------
# Class folders / flat folders
# --------------------------------------------------------------------------------------------


def _is_image(name: str, extensions: tuple[str, ...]) -> bool:
    return not name.startswith(".") and name.lower().endswith(extensions)


def _images_under(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Image files under ``folder``, depth first in sorted order (a folder's files, then its
    sub-folders): regular files only (a FIFO or device named like an image would block or fail a
    reader), symlinks followed, each real folder listed once (a symlink loop or a second link to a
    listed folder adds nothing), hidden names skipped."""
    found: list[str] = []
    seen: set[str] = set()
    stack = [folder]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as err:
            logger.warning("skipping unreadable folder %s: %s", d, err.strerror or err)
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=True):
                    subdirs.append(e.path)
                elif _is_image(e.name, extensions) and e.is_file(follow_symlinks=True):
                    found.append(e.path)
            except OSError:  # a dangling symlink
                continue
        stack.extend(reversed(subdirs))
    return found


class ImageFolderDataset(Dataset):
    """Images from an ImageNet-style class-folder tree or from a flat folder.

    Layouts:
        * ``"classes"``: ``root/<class>/**/<image>``; classes are the sorted sub-folder names
          and labels their positions (the torchvision ``ImageFolder`` convention, so ImageNet's
          ``n01440764`` ... folders give the standard 0..999 labels).
        * ``"flat"``: every image under ``root`` (recursively), label :data:`UNLABELED` (-1).
        * ``"auto"``: ``"classes"`` when ``root`` holds no images itself but has sub-folders,
          otherwise ``"flat"``.

    Args:
        root: the folder.
        transform: ``img -> out`` or ``(img, rng) -> out`` applied to the decoded RGB image; a
            PIL result is turned into a (3, H, W) tensor in [-1, 1]. ``None`` keeps the full
            image (only batchable when all images share one size).
        extensions: accepted file endings, compared case-insensitively.
        layout: ``"auto"``, ``"classes"`` or ``"flat"``.
        seed: seed of the per-sample augmentation stream.
        on_error: ``"next"`` returns the next readable image in place of an unreadable one;
            ``"none"`` returns ``None`` (batch with :func:`collate_drop_none`).

    Raises:
        ValueError: ``root`` is not a folder or holds no images.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        transform: Optional[Transform] = None,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        layout: Literal["auto", "classes", "flat"] = "auto",
        seed: int = 0,
        on_error: Literal["next", "none"] = "next",
    ) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise ValueError(f"image folder {self.root!r} does not exist or is not a directory")
        if layout not in ("auto", "classes", "flat"):
            raise ValueError(f"layout must be 'auto', 'classes' or 'flat', got {layout!r}")
        if on_error not in ("next", "none"):
            raise ValueError(f"on_error must be 'next' or 'none', got {on_error!r}")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.extensions = exts

        entries = sorted(e for e in os.listdir(self.root) if not e.startswith("."))
        subdirs = [e for e in entries if os.path.isdir(os.path.join(self.root, e))]
        top_images = [e for e in entries if _is_image(e, exts) and os.path.isfile(os.path.join(self.root, e))]
        if layout == "auto":
            layout = "classes" if subdirs and not top_images else "flat"
        self.layout = layout

        self.samples: list[tuple[str, int]] = []
        if layout == "classes":
            self.classes = subdirs
            for label, cls in enumerate(subdirs):
                files = _images_under(os.path.join(self.root, cls), exts)
                if not files:
                    logger.warning("class folder %s holds no images", os.path.join(self.root, cls))
                self.samples.extend((f, label) for f in files)
        else:
            self.classes = []
            self.samples = [(f, UNLABELED) for f in _images_under(self.root, exts)]
        if not self.samples:
            raise ValueError(
                f"image folder {self.root!r} contains no images with extensions {' '.join(exts)}"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self._takes_rng = transform is not None and accepts_rng(transform)
        self.seed = seed
        self.epoch = 0
        self.on_error = on_error
        self.num_skipped = 0
        self.skipped_files: list[str] = []
        self._bad: set[int] = set()

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for a flat folder)."""
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _record_bad(self, index: int, err: UnreadableImageError) -> None:
        self._bad.add(index)
        self.num_skipped += 1
        self.skipped_files.append(self.samples[index][0])
        logger.warning("skipping unreadable image (%d skipped in this process): %s", self.num_skipped, err)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        rng = _item_rng(self.seed, self.epoch, index)
        for step in range(len(self)):
            j = (index + step) % len(self)
            if j in self._bad:
                if self.on_error == "none":
                    return None
                continue
            path, label = self.samples[j]
            try:
                img = load_rgb(path)
            except UnreadableImageError as err:
                self._record_bad(j, err)
                if self.on_error == "none":
                    return None
                continue
            return _apply(self.transform, self._takes_rng, img, rng), label
        raise RuntimeError(f"no readable image left in folder {self.root!r}")

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={self.root!r}, layout={self.layout!r}, images={len(self)}, "
            f"classes={self.num_classes}, transform={self.transform!r})"
        )


# --------------------------------------------------------------------------------------------
# webdataset shards
# --------------------------------------------------------------------------------------------

_GLOB_CHARS = ("*", "?", "[")
_LABEL_FIELDS = ("cls", "cls.txt", "label", "label.txt", "class", "class.txt")
_JSON_LABEL_KEYS = ("label", "cls", "class", "class_id", "target")


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shard_urls(urls: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                      allow_pipe: bool = False) -> list[str]:
    """Expand shard specifications into a list of shard paths.

    A string may join several specifications with ``::``; each may be a brace pattern
    (``shards/train-{0000..0099}.tar``), a glob (``shards/*.tar``, sorted) or a plain path.
    Local paths must exist; URL shards are passed through unchecked. A ``pipe:`` shard runs a
    shell command (webdataset's feature): refused unless ``allow_pipe`` (the CLI's
    ``--allow-code-execution``, which a config file cannot set).

    Raises:
        ValueError: nothing matches, a local shard does not exist, or a ``pipe:`` without ``allow_pipe``.
    """
    expand_urls = require("webdataset.shardlists", "reading tar shards").expand_urls  # brace + '::' expansion

    specs = [os.fspath(urls)] if isinstance(urls, (str, os.PathLike)) else [os.fspath(u) for u in urls]
    out: list[str] = []
    for spec in specs:
        for url in expand_urls(spec):
            if url.startswith("pipe:") and not allow_pipe:
                raise ValueError(f"data spec {url!r} runs a shell command (webdataset 'pipe:'): refused unless you "
                                 "pass --allow-code-execution on the command line (a config file cannot enable it)")
            if _is_remote(url):
                out.append(url)
            elif any(c in url for c in _GLOB_CHARS):
                matches = sorted(glob.glob(os.path.expanduser(url)))
                if not matches:
                    raise ValueError(f"shard pattern {url!r} matches no file")
                out.extend(matches)
            else:
                path = os.path.expanduser(url)
                if not os.path.isfile(path):
                    raise ValueError(f"webdataset shard {path!r} does not exist")
                out.append(path)
    if not out:
        raise ValueError(f"shard specification {urls!r} names no shard")
    return out


def _split_by_rank(src: Iterator[Any], rank: int, world_size: int) -> Iterator[Any]:
    # Same rule as webdataset.split_by_node, with an explicit rank (for tests, or launchers
    # that do not set RANK/WORLD_SIZE).
    return itertools.islice(src, rank, None, world_size)


def _parse_label(sample: dict[str, Any]) -> int:
    for field in _LABEL_FIELDS:
        if field in sample:
            value = sample[field]
            text = value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
            return int(text.strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict):
            for key in _JSON_LABEL_KEYS:
                if key in meta and meta[key] is not None:
                    return int(meta[key])
    return UNLABELED


class WebDatasetShards(IterableDataset):
    """Images streamed from webdataset tar shards.

    Each sample's image is the first field whose last extension is an image type (``jpg``,
    ``png``, ``webp``, ...), decoded with :func:`~hieratok.data.images.load_rgb`; its label comes
    from a ``cls`` field (or ``label`` / ``class``, text) or a ``json`` field's ``label`` /
    ``cls`` / ``class`` key, else -1.

    Sharding: shard order is shuffled with (``seed``, epoch) identically on every rank, then
    dealt to ranks (``webdataset.split_by_node``, or the explicit ``rank``/``world_size``) and
    to DataLoader workers (``webdataset.split_by_worker``), so no sample is read twice per
    epoch. Use at least ``world_size * num_workers`` shards to keep every worker busy. Within a
    worker an optional shuffle buffer mixes samples (seeded by seed, epoch, rank and worker).

    Errors: corrupt tar members, undecodable images and bad labels go to webdataset's handler
    hook, which logs a warning, increments ``num_skipped`` (per process) and continues.
    ``num_skipped`` counts handler calls: a truncated shard may be reported twice (once by the
    member reader, once by the shard reader) before the pipeline moves to the next shard.

    Streaming cannot restart mid-epoch: a resumed run starts the interrupted epoch over.

    Args:
        urls: shard paths, a glob, a brace pattern, or several joined with ``::``
            (see :func:`expand_shard_urls`).
        allow_pipe: accept ``pipe:`` shards, which run shell commands.
        transform: ``img -> out`` or ``(img, rng) -> out``; a PIL result becomes a tensor.
        seed: seed for shard order, shuffle buffer and augmentations.
        shuffle_shards: shuffle the shard order each epoch.
        shuffle_buffer: size of the in-worker sample shuffle buffer (0 disables it).
        rank: this rank; ``None`` uses webdataset's detection (RANK env var or torch.distributed).
        world_size: number of ranks; must be given together with ``rank``.
    """

    def __init__(
        self,
        urls: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        transform: Optional[Transform] = None,
        *,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        allow_pipe: bool = False,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size - 1}], got {rank}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls = expand_shard_urls(urls, allow_pipe=allow_pipe)
        if world_size is not None and len(self.urls) < world_size:
            raise ValueError(f"{len(self.urls)} shard(s) cannot be split over {world_size} ranks")
        self.transform = transform
        self._takes_rng = transform is not None and accepts_rng(transform)
        self.seed = seed
        self.epoch = 0
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.image_exts = tuple(e.lower().lstrip(".") for e in extensions)
        self.num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order, shuffle buffer and augmentations depend on it)."""
        self.epoch = epoch

    def _handler(self, exn: BaseException) -> bool:
        self.num_skipped += 1
        logger.warning("skipping corrupt webdataset sample (%d skipped in this process): %s",
                       self.num_skipped, _one_line(exn))
        return True  # continue with the next sample

    def _decode(self, sample: dict[str, Any]) -> tuple[Any, int]:
        key, url = sample.get("__key__"), sample.get("__url__", "?")
        field = next((f for f in sample if not f.startswith("__") and f.rsplit(".", 1)[-1] in self.image_exts), None)
        if field is None:
            fields = sorted(f for f in sample if not f.startswith("__"))
            raise ValueError(f"sample {key} in {url} has no image field (fields: {fields})")
        img = load_rgb(sample[field], name=f"{url}:{key}.{field}")
        label = _parse_label(sample)
        rng = _item_rng(self.seed, self.epoch, f"{os.path.basename(str(url))}/{key}")
        return _apply(self.transform, self._takes_rng, img, rng), label

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        wds = require("webdataset", "reading tar shards")

        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"hieratok-shards/{self.seed}/{self.epoch}").shuffle(urls)
        if self.world_size is not None:
            node_splitter: Callable = functools.partial(_split_by_rank, rank=self.rank, world_size=self.world_size)
            rank = self.rank
        else:
            node_splitter = wds.split_by_node
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
            if len(urls) < world_size:
                raise ValueError(f"{len(urls)} shard(s) cannot be split over {world_size} ranks")
        info = get_worker_info()
        worker = info.id if info is not None else 0

        stages: list[Any] = [
            wds.SimpleShardList(urls),
            node_splitter,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self._handler),
        ]
        if self.shuffle_buffer > 0:
            rng = random.Random(f"hieratok-buffer/{self.seed}/{self.epoch}/{rank}/{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        stages.append(wds.map(self._decode, handler=self._handler))
        yield from wds.DataPipeline(*stages)

    def __repr__(self) -> str:
        return f"WebDatasetShards(shards={len(self.urls)}, transform={self.transform!r})"


# --------------------------------------------------------------------------------------------
# Photographs shipped inside installed packages (no download)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedPhoto:
    """A photograph file shipped inside an installed package."""

    name: str
    package: str  # importable top-level package that ships the file
    relpath: str  # path inside the package directory
    split: Literal["train", "heldout"]

    def path(self) -> Optional[str]:
        """The file on disk, or ``None`` if the package or the file is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], self.relpath)
        return path if os.path.isfile(path) else None


# The split is fixed by name. Held out (never served by the train split): chelsea (a cat),
# rocket (a launch scene) and flower (a close-up). Near-duplicates stay out entirely
# (motorcycle_right is the stereo twin of motorcycle_left).
EMBEDDED_PHOTOS: tuple[EmbeddedPhoto, ...] = (
    EmbeddedPhoto("astronaut", "skimage", "data/astronaut.png", "train"),  # 512x512 RGB
    EmbeddedPhoto("camera", "skimage", "data/camera.png", "train"),  # 512x512 grey
    EmbeddedPhoto("coffee", "skimage", "data/coffee.png", "train"),  # 600x400 RGB
    EmbeddedPhoto("motorcycle_left", "skimage", "data/motorcycle_left.png", "train"),  # 741x500
    EmbeddedPhoto("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg", "train"),  # 1000x872
    EmbeddedPhoto("immunohistochemistry", "skimage", "data/ihc.png", "train"),  # 512x512 RGB
    EmbeddedPhoto("retina", "skimage", "data/retina.jpg", "train"),  # 1411x1411 RGB
    EmbeddedPhoto("coins", "skimage", "data/coins.png", "train"),  # 384x303 grey
    EmbeddedPhoto("moon", "skimage", "data/moon.png", "train"),  # 512x512 grey
    EmbeddedPhoto("china", "sklearn", "datasets/images/china.jpg", "train"),  # 640x427 RGB
    EmbeddedPhoto("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "train"),  # 512x600
    EmbeddedPhoto("chelsea", "skimage", "data/chelsea.png", "heldout"),  # 451x300 RGB
    EmbeddedPhoto("rocket", "skimage", "data/rocket.jpg", "heldout"),  # 640x427 RGB
    EmbeddedPhoto("flower", "sklearn", "datasets/images/flower.jpg", "heldout"),  # 640x427 RGB
)


@functools.lru_cache(maxsize=64)
def _load_photo(path: str, short_side: Optional[int]) -> Image.Image:
    img = load_rgb(path)
    return img if short_side is None else resize_short_side(img, short_side)


class EmbeddedPhotos(Dataset):
    """The built-in dataset: real photographs from scikit-image, scikit-learn and matplotlib.

    Nothing is downloaded: the photos (see :data:`EMBEDDED_PHOTOS`) are files those installed
    packages ship; grey photos become RGB. A photo whose file is missing is skipped with a
    warning.

    * ``split="train"``: ``length`` samples per epoch; sample ``i`` of epoch ``e`` is a random
      photo, a uniformly placed ``size`` crop and a random horizontal flip, all drawn from a
      generator seeded by (``seed``, ``e``, ``i``), so it is a pure function of those.
    * ``split="heldout"``: a fixed set of ``crops_per_photo`` crops per held-out photo, placed
      along the diagonal at fractions (j + 0.5) / crops_per_photo of the free range (the
      middle one of an odd count is the centre crop), no flip; label = photo position.

    Photos smaller than ``size`` are upscaled (bicubic). ``short_side`` first rescales every
    photo (ADM style, aspect kept) so crops cover more of the scene at small sizes.

    Args:
        split: ``"train"`` or ``"heldout"``.
        size: crop side in pixels.
        length: train samples per epoch (default 1024); must be ``None`` for ``"heldout"``.
        seed: seed of the crop stream.
        hflip: random horizontal flips (train only).
        crops_per_photo: held-out crops per photo.
        short_side: if set (>= size), resize each photo so its shorter side has this length.
    """

    def __init__(
        self,
        split: Literal["train", "heldout"] = "train",
        size: int = 256,
        *,
        length: Optional[int] = None,
        seed: int = 0,
        hflip: bool = True,
        crops_per_photo: int = 4,
        short_side: Optional[int] = None,
    ) -> None:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.hw = check_hw(size)  # a side, or (height, width) for an aspect-ratio bucket
        if short_side is not None and short_side < min(self.hw):
            raise ValueError(f"short_side ({short_side}) must be >= size ({size})")
        if crops_per_photo < 1:
            raise ValueError(f"crops_per_photo must be >= 1, got {crops_per_photo}")
        if split == "heldout" and length is not None:
            raise ValueError("length applies to the train split only; held-out size is photos * crops_per_photo")
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.split = split
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.hflip = hflip
        self.crops_per_photo = crops_per_photo
        self.short_side = short_side
        self.photos: list[EmbeddedPhoto] = []
        self._paths: list[str] = []
        for photo in EMBEDDED_PHOTOS:
            if photo.split != split:
                continue
            path = photo.path()
            if path is None:
                logger.warning("embedded photo %s (%s/%s) is not installed; skipping it",
                               photo.name, photo.package, photo.relpath)
                continue
            self.photos.append(photo)
            self._paths.append(path)
        if not self.photos:
            raise ValueError(f"no embedded photo of split {split!r} is installed (scikit-image, scikit-learn and "
                             f"matplotlib ship them): {install_hint('skimage')}")
        self.length = (length if length is not None else 1024) if split == "train" else (
            len(self.photos) * crops_per_photo)

    @property
    def names(self) -> list[str]:
        """Names of the photos this split serves."""
        return [p.name for p in self.photos]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops the train split serves."""
        self.epoch = epoch

    def photo(self, k: int) -> Image.Image:
        """The ``k``-th photo of this split as an RGB image (after ``short_side`` resizing)."""
        return _load_photo(self._paths[k], self.short_side)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        if self.split == "train":
            rng = _item_rng(self.seed, self.epoch, index)
            k = rng.randrange(len(self.photos))
            img = random_crop(self.photo(k), self.hw, rng)
            if self.hflip:
                img = RandomHorizontalFlip(0.5)(img, rng)
            return pil_to_tensor(img), k
        k, j = divmod(index, self.crops_per_photo)
        img = self.photo(k)
        h, w = self.hw
        img = upscale_to_cover(img, self.hw)
        # Crop j sits at fraction (j + 0.5) / n of the free range on both axes (integer maths,
        # so the middle crop of an odd n is exactly the centre crop of center_crop_arr).
        top = (2 * j + 1) * (img.height - h) // (2 * self.crops_per_photo)
        left = (2 * j + 1) * (img.width - w) // (2 * self.crops_per_photo)
        return pil_to_tensor(img.crop((left, top, left + w, top + h))), k

    def __repr__(self) -> str:
        return f"EmbeddedPhotos(split={self.split!r}, size={self.size}, photos={self.names}, length={self.length})"


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

_EVAL_SPLITS = ("val", "eval", "heldout", "test", "validation")


def build_transform(
    size: int,
    train: bool,
    *,
    random_resized_crop_scale: Optional[tuple[float, float]] = None,
    hflip: bool = True,
) -> Compose:
    """The standard pipelines for image-folder and shard datasets.

    Train: ADM centre crop (or, with ``random_resized_crop_scale``, a random resized crop)
    followed by a random horizontal flip. Eval: ADM centre crop only (the FID protocol).
    """
    if not train:
        return Compose([CenterCrop(size)])
    crop = CenterCrop(size) if random_resized_crop_scale is None else RandomResizedCrop(size, random_resized_crop_scale)
    return Compose([crop, RandomHorizontalFlip(0.5)] if hflip else [crop])


def _looks_like_shards(spec: str) -> bool:
    return any(m in spec for m in (".tar", "::", "{", *_GLOB_CHARS)) or _is_remote(spec)


def build_dataset(
    spec: Union[str, os.PathLike, Sequence[str], None],
    split: str,
    size: int,
    *,
    seed: int = 0,
    length: Optional[int] = None,
    random_resized_crop_scale: Optional[tuple[float, float]] = None,
    hflip: bool = True,
    shuffle_buffer: int = 1000,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    crops_per_photo: int = 4,
    short_side: Optional[int] = None,
    on_error: Literal["next", "none"] = "next",
    allow_pipe: bool = False,
) -> Union[EmbeddedPhotos, ImageFolderDataset, WebDatasetShards]:
    """Pick the dataset a data specification names.

    Args:
        spec: ``None`` (or ``"embedded"``) -> :class:`EmbeddedPhotos`; a directory ->
            :class:`ImageFolderDataset`; a ``.tar`` path, glob, brace pattern or list of shards ->
            :class:`WebDatasetShards`.
        split: ``"train"`` (augmented) or an evaluation split (``"val"``, ``"eval"``,
            ``"heldout"``, ``"test"``: ADM centre crop; the embedded photos' held-out split).
        size: output image side.
        seed: augmentation / order seed.
        length: train samples per epoch of the embedded photos (ignored otherwise).
        random_resized_crop_scale: use a random resized crop with this area range for training
            instead of the ADM centre crop.
        hflip: random horizontal flip for training.
        shuffle_buffer: sample shuffle buffer of shard datasets (train only).
        rank: explicit rank for shard splitting (with ``world_size``).
        world_size: explicit world size for shard splitting.
        crops_per_photo: held-out crops per photo of the embedded photos.
        short_side: embedded photos only: rescale each photo's short side to this first, so a
            crop covers more of the scene at small sizes.
        on_error: image folders only: ``"next"`` serves the next readable image in place of an
            unreadable one (training); ``"none"`` returns ``None`` for it, so every image is
            seen at most once (evaluation; batch with :func:`collate_drop_none`).
        allow_pipe: accept webdataset ``pipe:`` shards, which run shell commands.

    Raises:
        ValueError: unknown split, or ``spec`` is neither a folder nor a shard specification.
    """
    if split != "train" and split not in _EVAL_SPLITS:
        raise ValueError(f"split must be 'train' or one of {_EVAL_SPLITS}, got {split!r}")
    train = split == "train"
    if spec is None or (isinstance(spec, str) and spec.lower() in ("embedded", "embedded-photos")):
        return EmbeddedPhotos("train" if train else "heldout", size, length=length if train else None,
                              seed=seed, hflip=hflip, crops_per_photo=crops_per_photo, short_side=short_side)
    transform = build_transform(size, train, random_resized_crop_scale=random_resized_crop_scale, hflip=hflip)
    if isinstance(spec, (list, tuple)):
        return WebDatasetShards(list(spec), transform, seed=seed, shuffle_shards=train,
                                shuffle_buffer=shuffle_buffer if train else 0, rank=rank, world_size=world_size,
                                allow_pipe=allow_pipe)
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        return ImageFolderDataset(spec, transform, seed=seed, on_error=on_error)
    if _looks_like_shards(spec):
        return WebDatasetShards(spec, transform, seed=seed, shuffle_shards=train,
                                shuffle_buffer=shuffle_buffer if train else 0, rank=rank, world_size=world_size,
                                allow_pipe=allow_pipe)
    raise ValueError(f"data spec {spec!r} is neither a directory nor a .tar shard / glob / brace pattern")


# --------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# --------------------------------------------------------------------------------------------


class BucketedDataset(Dataset):
    """The same images served at several sizes: one dataset per aspect-ratio bucket, all of the same
    length. Its keys are ``(index, bucket)`` pairs, as :class:`hieratok.data.sampler.BucketBatchSampler`
    yields them (one bucket per batch, so every batch has one shape)."""

    def __init__(self, datasets: Sequence[Any], sizes: Sequence[tuple[int, int]]) -> None:
        if len(datasets) != len(sizes) or not datasets:
            raise ValueError(f"need one dataset per bucket, got {len(datasets)} for {len(sizes)} sizes")
        if len({len(d) for d in datasets}) != 1:
            raise ValueError("bucket datasets must have the same length")
        self.datasets, self.sizes = list(datasets), [tuple(s) for s in sizes]

    def __len__(self) -> int:
        return len(self.datasets[0])

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, bucket = key
        return self.datasets[bucket][index]

    def __repr__(self) -> str:
        return f"BucketedDataset(sizes={self.sizes}, {self.datasets[0]!r})"


def build_bucketed_dataset(
    spec: Union[str, os.PathLike, None],
    sizes: Sequence[tuple[int, int]],
    *,
    seed: int = 0,
    length: Optional[int] = None,
    random_resized_crop_scale: Optional[tuple[float, float]] = None,
    hflip: bool = True,
    short_side: Optional[int] = None,
) -> BucketedDataset:
    """Training data in aspect-ratio buckets of ``sizes`` (height, width).

    The embedded photos serve native-resolution random crops of each bucket's shape (as they do for
    squares); an image folder serves :func:`~hieratok.data.transforms.bucket_transform`'s random
    resized crops (one folder scan, shared by the buckets). Shards stream in order and cannot be
    indexed by bucket: a ValueError.
    """
    sizes = [check_hw(s) for s in sizes]
    if spec is None or (isinstance(spec, str) and spec.lower() in ("embedded", "embedded-photos")):
        return BucketedDataset([EmbeddedPhotos("train", hw, length=length, seed=seed, hflip=hflip, short_side=short_side)
                                for hw in sizes], sizes)
    spec = os.fspath(spec)
    if not os.path.isdir(spec):
        raise ValueError(f"data.buckets needs an image folder or the embedded photos (indexable data); {spec!r} is not a folder")
    base = ImageFolderDataset(spec, None, seed=seed)
    parts = []
    for hw in sizes:
        d = copy.copy(base)
        d.transform = bucket_transform(hw, random_resized_crop_scale, hflip)
        d._takes_rng = True
        parts.append(d)
    return BucketedDataset(parts, sizes)
