"""Experiment loggers. W&B is the default and runs offline unless ``logger.mode=online``: no account and
no network needed (``wandb sync <run_dir>/wandb/offline-run-*`` uploads later)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

LOGGER_CHOICES = ("wandb", "csv", "none")


def make_logger(logger_cfg: DictConfig, run_dir: str | Path, run_name: str, config: DictConfig | None = None,
                group: str | None = None) -> Logger | None:
    """One logger per run, shared by every stage's Trainer (metric names carry the stage prefix)."""
    name = logger_cfg.name
    run_dir = Path(run_dir)
    if name == "none":
        return None
    if name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if name == "wandb":
        if logger_cfg.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={logger_cfg.mode!r}: choose offline, online or disabled")
        # Offline mode writes under run_dir/wandb and never opens a socket to the W&B servers.
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ["WANDB_MODE"] = logger_cfg.mode
        kwargs: dict[str, Any] = {}
        if config is not None:
            kwargs["config"] = OmegaConf.to_container(config, resolve=True, throw_on_missing=False, enum_to_str=True)
        return WandbLogger(
            project=logger_cfg.project,
            name=run_name,
            group=group or logger_cfg.group,
            save_dir=str(run_dir),
            mode=logger_cfg.mode,
            **kwargs,
        )
    raise ValueError(f"logger.name={name!r} is not one of {LOGGER_CHOICES}; use logger=wandb|csv|none")


def finish_logger(logger: Logger | None) -> None:
    """Close the W&B run so the next run in the same process (multirun, tests) starts a fresh one."""
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()
