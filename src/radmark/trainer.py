"""Building Lightning Trainers from the ``trainer`` config group, the same way for every stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger


def make_trainer(
    trainer_cfg: DictConfig,
    default_root_dir: str | Path,
    max_epochs: int | None = None,
    logger: Logger | None = None,
    callbacks: list[Any] | None = None,
    **overrides: Any,
) -> pl.Trainer:
    kwargs: dict[str, Any] = dict(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        deterministic=trainer_cfg.deterministic,
        default_root_dir=str(default_root_dir),
        logger=logger if logger is not None else False,
        callbacks=callbacks or [],
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    if max_epochs is not None:
        kwargs["max_epochs"] = max_epochs
    if trainer_cfg.limit_train_batches is not None:
        kwargs["limit_train_batches"] = trainer_cfg.limit_train_batches
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
