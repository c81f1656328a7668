"""Read datasets from their original on-disk formats into "pools" of stored images.

Every image in radmark is *the stored image*: a ``torch.uint8`` tensor of shape ``(3, S, S)`` with
``S = data.image_size``. Normalisation and augmentation happen later (see :mod:`radmark.data.transforms`),
so marking, saving and reloading work on exact integer pixels.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

DATASET_NAMES = ("fashion_mnist", "cifar10", "imagefolder")

# Debian/Ubuntu package `dataset-fashion-mnist`; a module attribute so tests can point it elsewhere.
FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def to_stored_image(
    x: torch.Tensor, image_size: int, resize: int, pad_if_smaller: bool = False
) -> torch.Tensor:
    """The single place where an image becomes a stored image: uint8 ``(3, image_size, image_size)``.

    ``x`` is uint8 ``(C, H, W)`` with C in {1, 3}. One channel is repeated to three.
    Size: if ``pad_if_smaller`` (tensor datasets) and the image fits inside ``image_size``, it is zero-padded,
    centred (Fashion-MNIST 28 -> 32 adds 2 px per side: lossless, so marks live on the real pixels).
    Otherwise the shorter side is resized to ``resize`` (antialiased) and the centre ``image_size`` square cut.
    """
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 (C, H, W) image with C in (1, 3), got {x.dtype} {tuple(x.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    h, w = x.shape[-2:]
    if h == w == image_size:
        return x.contiguous()
    if pad_if_smaller and h <= image_size and w <= image_size:
        top, left = (image_size - h) // 2, (image_size - w) // 2
        out = torch.zeros(3, image_size, image_size, dtype=torch.uint8)
        out[:, top : top + h, left : left + w] = x
        return out
    if min(h, w) != resize:
        x = TF.resize(x, [resize], antialias=True)
    return TF.center_crop(x, [image_size, image_size]).contiguous()


class ImagePool:
    """A whole train or test set, indexed ``0..len-1``. ``get(i)`` is the stored uint8 ``(3, S, S)`` image."""

    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def get_many(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Stored images ``(n, 3, S, S)`` for pool indices ``indices``."""
        return torch.stack([self.get(int(i)) for i in indices])


class TensorPool(ImagePool):
    """Pool held in memory as the raw uint8 ``(N, C, H, W)`` tensor; conversion happens per ``get``."""

    def __init__(
        self, images: torch.Tensor, labels: np.ndarray, classes: list[str], image_size: int, resize: int
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.image_size = image_size
        self.resize = resize

    def get(self, i: int) -> torch.Tensor:
        return to_stored_image(self.images[i], self.image_size, self.resize, pad_if_smaller=True)


class FolderPool(ImagePool):
    """Pool of image files decoded lazily on each ``get`` (ImageNet-sized sets do not fit in memory)."""

    def __init__(
        self, files: list[Path], labels: np.ndarray, classes: list[str], image_size: int, resize: int
    ):
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.image_size = image_size
        self.resize = resize

    def get(self, i: int) -> torch.Tensor:
        return to_stored_image(decode_rgb(self.files[i]), self.image_size, self.resize)


def decode_rgb(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 RGB ``(3, H, W)``: torchvision's decoders, PIL for other formats."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (``.gz`` or not) with ``ndim`` dimensions."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise ValueError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic {raw[:4].hex() or 'empty'}, expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX dims {dims} need {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _fashion_dirs(root: Path) -> list[Path]:
    return [root, root / "FashionMNIST" / "raw", *FASHION_MNIST_SYSTEM_DIRS]


def _find_fashion_files(root: Path) -> dict[str, Path] | None:
    for directory in _fashion_dirs(root):
        found = {key: _find_idx(directory, stem) for key, stem in _FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _load_fashion_mnist(data_cfg: Any) -> tuple[ImagePool, ImagePool]:
    root = Path(str(data_cfg.root)).expanduser()
    files = _find_fashion_files(root)
    download_error = None
    if files is None and data_cfg.download:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(root), train=train, download=True)
            files = _find_fashion_files(root)
        except Exception as e:  # any download failure ends in the same clear message
            download_error = e
    if files is None:
        tried = "\n  ".join(str(d) for d in _fashion_dirs(root))
        note = f"\nDownload failed: {download_error!r}" if download_error else ""
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files ({', '.join(_FASHION_FILES.values())}, optionally .gz) not found in any of:\n"
            f"  {tried}{note}\nFix: `make install`, or `apt-get install dataset-fashion-mnist`, "
            f"or put the IDX files in {root} (data.root), or set data.download=true with internet access."
        )
    pools = []
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], ndim=3)
        labels = read_idx(files[f"{split}_labels"], ndim=1)
        if len(images) != len(labels):
            raise ValueError(
                f"{files[f'{split}_images']} has {len(images)} images but "
                f"{files[f'{split}_labels']} has {len(labels)} labels"
            )
        # Keep the 1-channel raw images (4x smaller in memory); channels and padding happen in get().
        tensor = torch.from_numpy(images.copy()).unsqueeze(1)
        pools.append(TensorPool(tensor, labels.astype(np.int64), FASHION_MNIST_CLASSES,
                                int(data_cfg.image_size), int(data_cfg.resize)))  # fmt: skip
    return pools[0], pools[1]


# ---------------------------------------------------------------- CIFAR-10 (python pickles)

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # the original files are Python 2 pickles
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get(b"fine_labels", entry.get("labels")))
    if data is None or labels is None:
        raise ValueError(f"{path}: not a CIFAR batch (no b'data' / b'labels' entries)")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(
            f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}, {len(labels)}"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _load_cifar10(data_cfg: Any) -> tuple[ImagePool, ImagePool]:
    root = Path(str(data_cfg.root)).expanduser()
    base = root / _CIFAR_DIR
    needed = [base / n for n in _CIFAR_TRAIN + _CIFAR_TEST]
    missing = [p for p in needed if not p.is_file()]
    download_error = None
    if missing and data_cfg.download:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root), train=True, download=True)
            missing = [p for p in needed if not p.is_file()]
        except Exception as e:  # offline, proxy, checksum: all end in the message below
            download_error = e
    if missing:
        note = f"\nDownload failed: {download_error!r}" if download_error else ""
        raise FileNotFoundError(
            f"CIFAR-10 batches missing: {', '.join(str(p) for p in missing)}{note}\n"
            f"Fix: `make install` (downloads it), set data.download=true with internet access, or unpack "
            f"cifar-10-python.tar.gz into {root} (data.root) so that {base} exists."
        )
    classes = CIFAR10_CLASSES
    meta = base / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            names = pickle.load(f, encoding="bytes").get(b"label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    pools = []
    for names in (_CIFAR_TRAIN, _CIFAR_TEST):
        parts = [_read_cifar_batch(base / n) for n in names]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = np.concatenate([p[1] for p in parts])
        pools.append(TensorPool(images, labels, classes, int(data_cfg.image_size), int(data_cfg.resize)))
    return pools[0], pools[1]


# ---------------------------------------------------------------- ImageNet-style folders


def _scan_folder(split_dir: Path) -> tuple[list[str], list[Path], list[int]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        for p in sorted((split_dir / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
                labels.append(k)
    return classes, files, labels


def _load_imagefolder(data_cfg: Any) -> tuple[ImagePool, ImagePool]:
    root = Path(str(data_cfg.root)).expanduser()
    pools = []
    train_classes: list[str] = []
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"imagefolder: {split_dir} does not exist. Expected {root}/train/<class>/*.jpg|png and "
                f"{root}/val/<class>/* (set data.root)."
            )
        classes, files, labels = _scan_folder(split_dir)
        if not files:
            raise FileNotFoundError(
                f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}"
            )
        if split == "train":
            train_classes = classes
        elif classes != train_classes:
            only_train = sorted(set(train_classes) - set(classes))
            only_val = sorted(set(classes) - set(train_classes))
            raise ValueError(
                f"imagefolder: class folders of {split_dir} differ from {root / 'train'}: "
                f"only in train: {only_train[:10]}, only in val: {only_val[:10]}"
            )
        pools.append(
            FolderPool(files, np.asarray(labels), classes, int(data_cfg.image_size), int(data_cfg.resize))
        )
    return pools[0], pools[1]


_LOADERS = {"fashion_mnist": _load_fashion_mnist, "cifar10": _load_cifar10, "imagefolder": _load_imagefolder}


def load_pools(data_cfg: Any) -> tuple[ImagePool, ImagePool]:
    """The (train pool, test pool) of ``data_cfg.name``, checked against ``data_cfg.num_classes``."""
    name = str(data_cfg.name)
    if name not in _LOADERS:
        raise ValueError(
            f"data.name={name!r} is not a known dataset; choose one of {', '.join(DATASET_NAMES)}"
        )
    if int(data_cfg.resize) < int(data_cfg.image_size):
        raise ValueError(f"data.resize={data_cfg.resize} must be >= data.image_size={data_cfg.image_size}")
    train, test = _LOADERS[name](data_cfg)
    # The victim's head and the carriers are sized by num_classes: a mismatch must fail here, not later.
    if len(train.classes) != int(data_cfg.num_classes):
        raise ValueError(
            f"data.num_classes={data_cfg.num_classes} but {name} at {data_cfg.root} has "
            f"{len(train.classes)} classes"
        )
    for pool in (train, test):
        if len(pool) and (pool.labels.min() < 0 or pool.labels.max() >= len(train.classes)):
            raise ValueError(f"{name} at {data_cfg.root}: labels outside 0..{len(train.classes) - 1}")
    return train, test
