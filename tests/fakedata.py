"""Tiny datasets written in the real on-disk formats, for tests (import as ``from fakedata import ...``)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist_idx(
    root: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0, gz: bool = True
) -> Path:
    """Fashion-MNIST IDX files (28x28 grayscale, 10 classes, labels cycling 0..9) directly in ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(arr)
            if gz:
                with gzip.open(root / (stem + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (root / stem).write_bytes(data)
    return root


def write_cifar10(root: str | Path, n_per_batch: int = 4, seed: int = 0) -> Path:
    """CIFAR-10 python batches under ``root/cifar-10-batches-py`` (5 train batches, 1 test batch, meta)."""
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n_per_batch)],
            b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)],
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f)
    return Path(root)


def write_imagefolder(
    root: str | Path,
    classes: tuple[str, ...] = ("ant", "bee", "cat"),
    n_train: int = 4,
    n_val: int = 2,
    seed: int = 0,
) -> Path:
    """``root/{train,val}/<class>/*`` with PNG (RGB and grayscale) and JPEG files of various sizes."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    shapes = [(40, 56), (64, 48), (33, 33), (80, 100)]
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = shapes[i % len(shapes)]
                kind = i % 3
                if kind == 0:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
                elif kind == 1:
                    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(d / f"{i}.png")
                else:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    return root
