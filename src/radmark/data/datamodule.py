"""Splits of a dataset (public / private / heldout / test) and their loaders, as a LightningDataModule."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from radmark.data.readers import ImagePool, load_pools
from radmark.data.transforms import make_transform

TRAIN_SPLITS = ("public", "private", "heldout")  # consecutive slices of one permutation of the train pool
SPLITS = (*TRAIN_SPLITS, "test")


class SplitDataset(Dataset):
    """Items ``(stored uint8 (3, S, S), label, index)``; ``index`` is the position inside the split."""

    def __init__(self, pool: ImagePool, pool_indices: np.ndarray, name: str = ""):
        self.pool = pool
        self.pool_indices = np.asarray(pool_indices, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.pool_indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        j = int(self.pool_indices[i])
        return self.pool.get(j), int(self.pool.labels[j]), int(i)

    @property
    def labels(self) -> np.ndarray:
        return self.pool.labels[self.pool_indices]


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image of each ``(image, label, index)`` item of ``base``."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label, index = self.base[i]
        return self.transform(image), label, index


def _split_lengths(sizes: dict[str, int], pool_size: int, where: str) -> dict[str, int]:
    """Resolve ``-1`` (at most one: "all that the others leave") and check the total fits the pool."""
    fixed = {k: int(v) for k, v in sizes.items() if int(v) != -1}
    rest = [k for k, v in sizes.items() if int(v) == -1]
    bad = {k: v for k, v in fixed.items() if v < 0}
    if bad or len(rest) > 1:
        raise ValueError(f"{where}: sizes must be >= 0, or -1 for at most one split; got {sizes}")
    total = sum(fixed.values())
    if total > pool_size:
        raise ValueError(f"{where}: {sizes} needs {total} images but the pool has only {pool_size}")
    out = {k: fixed.get(k, pool_size - total) for k in sizes}
    return out


class RadmarkDataModule(pl.LightningDataModule):
    """Loads the pools of ``data_cfg`` and draws the splits from ``split_seed``.

    ``split_seed`` alone decides which images are in which split; ``train_seed`` only drives data order in
    the training loader, so a new victim seed never moves an image between splits. Each split's indices are
    in permuted order, so any prefix of a split is a uniform random sample of it (pools are class-sorted).
    """

    def __init__(
        self,
        data_cfg: Any,
        split_seed: int,
        batch_size: int | None = None,
        train_augment: str = "crop_flip",
        train_seed: int = 0,
    ):
        super().__init__()
        self.data_cfg = data_cfg
        self.split_seed = int(split_seed)
        self.batch_size = int(batch_size if batch_size is not None else data_cfg.batch_size)
        self.train_augment = train_augment
        self.train_seed = int(train_seed)
        self.num_workers = int(data_cfg.num_workers)
        self.mean = [float(m) for m in data_cfg.mean]
        self.std = [float(s) for s in data_cfg.std]
        self.image_size = int(data_cfg.image_size)
        # The set the victim trains on; callers may replace it (private split with marked copies in place).
        self.train_dataset: Dataset | None = None
        self.train_pool: ImagePool | None = None
        self.test_pool: ImagePool | None = None
        self.split_indices: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ splits

    def setup(self, stage: str | None = None) -> None:
        if self.train_pool is not None:
            return
        train_pool, test_pool = load_pools(self.data_cfg)
        sizes = self.data_cfg.splits
        train_sizes = {k: int(getattr(sizes, k)) for k in TRAIN_SPLITS}
        lengths = _split_lengths(train_sizes, len(train_pool), "data.splits (public/private/heldout)")
        lengths.update(_split_lengths({"test": int(sizes.test)}, len(test_pool), "data.splits.test"))

        # One generator, drawn in a fixed order (train permutation, then test permutation).
        g = torch.Generator().manual_seed(self.split_seed)
        perm = torch.randperm(len(train_pool), generator=g).numpy()
        test_perm = torch.randperm(len(test_pool), generator=g).numpy()
        indices: dict[str, np.ndarray] = {}
        start = 0
        for name in TRAIN_SPLITS:
            indices[name] = perm[start : start + lengths[name]].astype(np.int64)
            start += lengths[name]
        indices["test"] = test_perm[: lengths["test"]].astype(np.int64)

        self.train_pool, self.test_pool = train_pool, test_pool
        self.split_indices = indices
        if self.train_dataset is None:
            self.train_dataset = self.dataset("private")

    def _pool_of(self, split: str) -> ImagePool:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.setup()
        pool = self.test_pool if split == "test" else self.train_pool
        assert pool is not None
        return pool

    def dataset(self, split: str) -> SplitDataset:
        """The stored images of ``split``: items ``(uint8 (3, S, S), label, index in split)``."""
        pool = self._pool_of(split)
        return SplitDataset(pool, self.split_indices[split], split)

    def labels(self, split: str) -> np.ndarray:
        return self._pool_of(split).labels[self.split_indices[split]]

    def split_sizes(self) -> dict[str, int]:
        self.setup()
        return {k: len(v) for k, v in self.split_indices.items()}

    def split_fingerprint(self, length: int = 16) -> str:
        """Short sha256 of the split indices: equal fingerprints mean identical splits."""
        self.setup()
        h = hashlib.sha256()
        for name in SPLITS:
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.split_indices[name], dtype="<i8").tobytes())
        return h.hexdigest()[:length]

    @property
    def classes(self) -> list[str]:
        return list(self._pool_of("public").classes)

    # ------------------------------------------------------------------ loaders

    def transform(self, augment: str = "none") -> Callable[[torch.Tensor], torch.Tensor]:
        return make_transform(augment, self.image_size, self.mean, self.std)

    def loader(
        self,
        dataset_or_split: Dataset | str,
        train: bool,
        augment: str = "none",
        batch_size: int | None = None,
        shuffle: bool | None = None,
    ) -> DataLoader:
        """DataLoader of ``(normalised float image, label, index)``; ``shuffle`` defaults to ``train``.

        Shuffling uses a generator seeded with ``train_seed`` (new order each epoch, same across runs).
        """
        base = self.dataset(dataset_or_split) if isinstance(dataset_or_split, str) else dataset_or_split
        bs = int(batch_size or self.batch_size)
        shuffle = train if shuffle is None else shuffle
        n = len(base)  # type: ignore[arg-type]
        return DataLoader(
            TransformedDataset(base, self.transform(augment)),
            batch_size=bs,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.train_seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # A final batch of one image breaks train-mode BatchNorm; drop it only in that case.
            drop_last=train and n > bs and n % bs == 1,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_dataset is not None
        return self.loader(self.train_dataset, train=True, augment=self.train_augment)

    def val_dataloader(self) -> DataLoader:
        return self.loader("test", train=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", train=False)
