"""Helpers shared by the tests (import as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str], hydra_node: bool = False):
    """The real ``conf/config.yaml`` with ``overrides``, as ``python -m radmark.run`` would compose it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_node)


def tiny_run_config(tmp: Path, overrides: list[str]):
    """The real config on fake Fashion-MNIST IDX files written under ``tmp``, with every path inside ``tmp``
    and the tiny public/private/test splits the end-to-end tests share; ``overrides`` come last."""
    from fakedata import write_fashion_mnist_idx

    root = write_fashion_mnist_idx(tmp / "fm", n_train=140, n_test=20)
    return compose_config([
        f"data.root={root}", "data.download=false", f"paths.output_dir={tmp / 'run'}",
        f"paths.cache_dir={tmp / 'cache'}", f"paths.data_dir={tmp}", f"paths.root_dir={tmp}",
        "data.splits.public=40", "data.splits.private=40", "data.splits.test=20", "marking.steps=2",
        "marking.network.epochs=1", "marking.batch_size=32", "logger=none", "trainer.enable_progress_bar=false",
        *overrides,
    ])


def random_images(n: int, seed: int = 0, size: int = 32, cycle_labels: bool = False):
    """``n`` random uint8 images (3, size, size) as a TensorDataset; labels all 0, or 0..9 cycling."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10 if cycle_labels else torch.zeros(n, dtype=torch.long)
    return TensorDataset(x, labels)


def random_resnet(seed: int, num_classes: int = 10):
    """An untrained torchvision ResNet-18 in eval mode, initialised from ``seed``."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()
