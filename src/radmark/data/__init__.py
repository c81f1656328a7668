"""Datasets as stored uint8 (3, S, S) images, their seeded splits, and the transforms to network inputs."""

from radmark.data.datamodule import SPLITS, RadmarkDataModule, SplitDataset, TransformedDataset
from radmark.data.readers import (
    DATASET_NAMES,
    FolderPool,
    ImagePool,
    TensorPool,
    load_pools,
    read_idx,
    to_stored_image,
)
from radmark.data.transforms import AUGMENTATIONS, denormalize, make_transform, normalize, to_float01

__all__ = [
    "AUGMENTATIONS",
    "DATASET_NAMES",
    "SPLITS",
    "FolderPool",
    "ImagePool",
    "RadmarkDataModule",
    "SplitDataset",
    "TensorPool",
    "TransformedDataset",
    "denormalize",
    "load_pools",
    "make_transform",
    "normalize",
    "read_idx",
    "to_float01",
    "to_stored_image",
]
