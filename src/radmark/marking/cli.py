"""Mark a dataset without training a victim: ``python -m radmark.marking.cli [overrides]``.

Prints the key's sha256 (publish it with the released data). Works with ``trainer=ddp_cpu``: Lightning
re-launches this module once per rank.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import radmark.config  # noqa: F401  (registers the schema in Hydra's ConfigStore)


@hydra.main(version_base="1.3", config_path="../../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from radmark.config import resolve_seeds
    from radmark.loggers import finish_logger, make_logger
    from radmark.marking.api import mark
    from radmark.pipeline import make_datamodule

    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = resolve_seeds(cfg.seeds)
    logger = make_logger(cfg.logger, run_dir, run_name=f"mark-{run_dir.name}", config=cfg)
    try:
        mark(cfg, make_datamodule(cfg, seeds), run_dir, logger=logger)
    finally:
        finish_logger(logger)


if __name__ == "__main__":
    main()
