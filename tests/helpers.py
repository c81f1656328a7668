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
