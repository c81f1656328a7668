"""Readers, splits, loaders and transforms on tiny files in the real on-disk formats."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import radmark.data.readers as readers
from fakedata import write_cifar10, write_fashion_mnist_idx, write_imagefolder
from radmark.config import DataConfig
from radmark.data import (
    RadmarkDataModule,
    load_pools,
    make_transform,
    normalize,
    read_idx,
    to_float01,
    to_stored_image,
)

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def data_cfg(name: str, root: Path, splits=(20, 20, 10, -1), **kw):
    cfg = OmegaConf.structured(DataConfig)
    cfg.name = name
    cfg.root = str(root)
    cfg.download = False
    cfg.batch_size = 8
    cfg.splits.public, cfg.splits.private, cfg.splits.heldout, cfg.splits.test = splits
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide the machine's Debian Fashion-MNIST so only the test's own files can be found."""
    monkeypatch.setattr(readers, "FASHION_MNIST_SYSTEM_DIRS", (tmp_path / "no-system-copy",))


@pytest.fixture
def fashion_root(tmp_path, no_system_fashion):
    return write_fashion_mnist_idx(tmp_path / "fmnist", n_train=60, n_test=20, seed=0)


def check_splits(dm: RadmarkDataModule, expected: dict[str, int]) -> None:
    assert dm.split_sizes() == expected
    train_idx = [dm.split_indices[k] for k in ("public", "private", "heldout")]
    joined = np.concatenate(train_idx)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    assert len(np.unique(dm.split_indices["test"])) == expected["test"]
    for split, n in expected.items():
        ds = dm.dataset(split)
        assert len(ds) == n
        image, label, index = ds[n - 1]
        assert image.dtype == torch.uint8 and image.shape == (3, dm.image_size, dm.image_size)
        assert isinstance(label, int) and index == n - 1
        assert label == dm.labels(split)[n - 1]


def test_fashion_mnist_loads_and_splits(fashion_root):
    dm = RadmarkDataModule(data_cfg("fashion_mnist", fashion_root), split_seed=3)
    dm.setup()
    check_splits(dm, {"public": 20, "private": 20, "heldout": 10, "test": 20})
    image = dm.dataset("public")[0][0]
    # Grayscale: three identical channels; 28 -> 32 zero-pads 2 px each side, the centre is the raw image.
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert image[:, :2].sum() == 0 and image[:, -2:].sum() == 0 and image[:, :, :2].sum() == 0
    raw = read_idx(fashion_root / "train-images-idx3-ubyte.gz", ndim=3)
    pool_index = int(dm.split_indices["public"][0])
    assert np.array_equal(image[0, 2:30, 2:30].numpy(), raw[pool_index])


def test_fashion_mnist_uncompressed_and_torchvision_layout(tmp_path, no_system_fashion):
    write_fashion_mnist_idx(tmp_path / "FashionMNIST" / "raw", n_train=12, n_test=5, gz=False)
    train, test = load_pools(data_cfg("fashion_mnist", tmp_path))
    assert (len(train), len(test)) == (12, 5)
    assert train.labels.dtype == np.int64 and len(train.classes) == 10


def test_split_seeds(fashion_root):
    cfg = data_cfg("fashion_mnist", fashion_root)
    a = RadmarkDataModule(cfg, split_seed=1, train_seed=0)
    b = RadmarkDataModule(cfg, split_seed=1, train_seed=99)
    c = RadmarkDataModule(cfg, split_seed=2, train_seed=0)
    for dm in (a, b, c):
        dm.setup()
    for k in a.split_indices:
        assert np.array_equal(a.split_indices[k], b.split_indices[k])
    assert a.split_fingerprint() == b.split_fingerprint() != c.split_fingerprint()
    assert not np.array_equal(a.split_indices["private"], c.split_indices["private"])


def test_minus_one_takes_the_rest_and_too_large_fails(fashion_root):
    dm = RadmarkDataModule(data_cfg("fashion_mnist", fashion_root, splits=(-1, 25, 5, 7)), split_seed=0)
    assert dm.split_sizes() == {"public": 30, "private": 25, "heldout": 5, "test": 7}
    with pytest.raises(ValueError, match=r"data\.splits.*pool has only 60"):
        RadmarkDataModule(
            data_cfg("fashion_mnist", fashion_root, splits=(40, 20, 10, -1)), split_seed=0
        ).setup()
    with pytest.raises(ValueError, match=r"data\.splits\.test.*only 20"):
        RadmarkDataModule(data_cfg("fashion_mnist", fashion_root, splits=(1, 1, 1, 21)), split_seed=0).setup()


def test_missing_files_name_the_paths(tmp_path, no_system_fashion):
    missing = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError, match="nothing-here") as err:
        load_pools(data_cfg("fashion_mnist", missing))
    assert "FashionMNIST/raw" in str(err.value) and "dataset-fashion-mnist" in str(err.value)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_pools(data_cfg("cifar10", missing))
    with pytest.raises(FileNotFoundError, match=r"nothing-here/train"):
        load_pools(data_cfg("imagefolder", missing))


def test_bad_idx_and_unknown_name(tmp_path):
    bad = tmp_path / "bad-idx.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + np.array([2, 28, 28], dtype=">u4").tobytes() + b"\x00" * 10)
    with pytest.raises(ValueError, match="bad-idx.gz"):
        read_idx(bad, ndim=3)
    with pytest.raises(ValueError, match="bad-idx.gz"):
        read_idx(bad, ndim=1)  # wrong magic
    with pytest.raises(ValueError, match=r"data\.name.*fashion_mnist, cifar10, imagefolder"):
        load_pools(data_cfg("mnist", tmp_path))


def test_cifar10(tmp_path):
    write_cifar10(tmp_path, n_per_batch=4, seed=1)
    dm = RadmarkDataModule(data_cfg("cifar10", tmp_path, splits=(5, 10, 5, 3)), split_seed=0)
    check_splits(dm, {"public": 5, "private": 10, "heldout": 5, "test": 3})
    assert dm.classes[0] == "airplane"
    # 32x32 colour images are stored unchanged.
    image = dm.dataset("private")[0][0]
    assert not torch.equal(image[0], image[1])


def test_imagefolder(tmp_path):
    write_imagefolder(tmp_path, classes=("ant", "bee", "cat"), n_train=4, n_val=2)
    cfg = data_cfg("imagefolder", tmp_path, splits=(4, 4, -1, -1), num_classes=3, image_size=24, resize=28)
    dm = RadmarkDataModule(cfg, split_seed=0)
    check_splits(dm, {"public": 4, "private": 4, "heldout": 4, "test": 6})
    pool = dm.train_pool
    assert pool.classes == ["ant", "bee", "cat"] and list(pool.labels) == [0] * 4 + [1] * 4 + [2] * 4
    gray = pool.get(1)  # file 1.png of each class is grayscale
    assert gray.shape == (3, 24, 24) and torch.equal(gray[0], gray[2])
    with pytest.raises(ValueError, match=r"data\.num_classes=10"):
        load_pools(data_cfg("imagefolder", tmp_path, num_classes=10, image_size=24, resize=28))
    (tmp_path / "val" / "dog").mkdir()
    (tmp_path / "val" / "dog" / "x.png").write_bytes((tmp_path / "val" / "ant" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="only in val: \\['dog'\\]"):
        load_pools(cfg)


def test_to_stored_image_resize_crop_and_pad():
    x = torch.randint(0, 256, (1, 20, 30), dtype=torch.uint8)
    out = to_stored_image(x, image_size=16, resize=18)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    padded = to_stored_image(x, image_size=32, resize=32, pad_if_smaller=True)
    assert torch.equal(padded[0, 6:26, 1:31], x[0])
    with pytest.raises(ValueError):
        to_stored_image(x.float(), 16, 16)


def test_loaders_and_swapped_train_set(fashion_root):
    dm = RadmarkDataModule(data_cfg("fashion_mnist", fashion_root), split_seed=0, batch_size=8, train_seed=5)
    dm.setup()
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and x.min() < 0
    assert y.dtype == torch.int64 and idx.max() < 20
    # Same train_seed, same order.
    assert torch.equal(next(iter(dm.train_dataloader()))[2], idx)
    xt, _, it = next(iter(dm.test_dataloader()))
    assert torch.equal(it, torch.arange(8))
    expected = normalize(to_float01(dm.dataset("test")[0][0]), dm.mean, dm.std)
    assert torch.allclose(xt[0], expected, atol=1e-6)
    # Victim training swaps in another set (e.g. private with marked copies in place).
    dm.train_dataset = dm.dataset("heldout")
    batch = next(iter(dm.loader(dm.train_dataset, train=True, augment="strong", batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and int(batch[2].max()) < 10
    assert sum(len(b[0]) for b in dm.train_dataloader()) == 10
    # 17 = 2 * 8 + 1: the lone last image would break train-mode BatchNorm, so it is dropped.
    assert [len(b[0]) for b in dm.loader(torch.utils.data.Subset(dm.dataset("public"), range(17)), True)] == [
        8,
        8,
    ]


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip", "strong"])
def test_make_transform(augment):
    t = make_transform(augment, 32, [0.5] * 3, [0.25] * 3)
    x = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    y = t(x)
    assert y.dtype == torch.float32 and y.shape == (3, 32, 32)
    if augment != "strong":
        assert torch.allclose(y, torch.full_like(y, 2.0))


def test_make_transform_unknown():
    with pytest.raises(ValueError, match="crop_flip"):
        make_transform("mixup", 32, [0.5] * 3, [0.5] * 3)


def test_normalize_is_differentiable():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    normalize(x, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0))


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist(tmp_path):
    train, test = load_pools(data_cfg("fashion_mnist", tmp_path / "empty"))
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    image = train.get(0)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and image.max() > 0
