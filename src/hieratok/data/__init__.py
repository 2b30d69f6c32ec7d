"""Data layer: robust image decoding, transforms, datasets and a resumable distributed sampler.

* :mod:`~hieratok.data.images`: any image file -> 8-bit RGB; PIL <-> tensors in [-1, 1].
* :mod:`~hieratok.data.transforms`: ADM centre crop, random resized crop, flips (no torchvision).
* :mod:`~hieratok.data.datasets`: class/flat image folders, webdataset shards, the built-in
  photographs shipped by installed packages, and :func:`build_dataset` to pick one.
* :mod:`~hieratok.data.sampler`: :class:`ResumableDistributedSampler`, and :class:`BucketBatchSampler`
  for aspect-ratio buckets (one shape per batch).
"""

from hieratok.data.datasets import (
    EMBEDDED_PHOTOS,
    IMAGE_EXTENSIONS,
    UNLABELED,
    BucketedDataset,
    EmbeddedPhoto,
    EmbeddedPhotos,
    ImageFolderDataset,
    WebDatasetShards,
    build_bucketed_dataset,
    build_dataset,
    build_transform,
    collate_drop_none,
    expand_shard_urls,
)
from hieratok.data.images import (
    UnreadableImageError,
    load_rgb,
    pil_to_tensor,
    tensor_to_pil,
    tensor_to_uint8,
    to_rgb,
)
from hieratok.data.sampler import BucketBatchSampler, ResumableDistributedSampler
from hieratok.data.transforms import (
    CenterCrop,
    Compose,
    RandomHorizontalFlip,
    RandomResizedCrop,
    center_crop_arr,
    random_crop,
    resize_short_side,
    upscale_to_cover,
)

__all__ = [
    "EMBEDDED_PHOTOS",
    "IMAGE_EXTENSIONS",
    "UNLABELED",
    "CenterCrop",
    "Compose",
    "EmbeddedPhoto",
    "EmbeddedPhotos",
    "ImageFolderDataset",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "ResumableDistributedSampler",
    "UnreadableImageError",
    "WebDatasetShards",
    "BucketBatchSampler",
    "BucketedDataset",
    "build_bucketed_dataset",
    "build_dataset",
    "build_transform",
    "center_crop_arr",
    "collate_drop_none",
    "expand_shard_urls",
    "load_rgb",
    "pil_to_tensor",
    "random_crop",
    "resize_short_side",
    "tensor_to_pil",
    "tensor_to_uint8",
    "to_rgb",
    "upscale_to_cover",
]
