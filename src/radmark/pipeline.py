"""The whole job, as plain functions: marking network -> key -> marked data -> victim -> detection.

``radmark.run`` calls :func:`run_experiment`; tests call the stage functions directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from radmark.config import resolve_seeds
from radmark.loggers import finish_logger, make_logger
from radmark.metrics import flatten, git_state, update_metrics

log = logging.getLogger(__name__)

# Settings recorded in every metrics.json (tables are built from these, never from folder names).
RECORDED_CONFIG = ("data", "marking", "victim", "detection")


def make_datamodule(cfg: DictConfig, seeds: dict[str, int]) -> Any:
    from radmark.data.datamodule import RadmarkDataModule

    dm = RadmarkDataModule(
        cfg.data,
        split_seed=seeds["splits"],
        batch_size=cfg.victim.batch_size,
        train_augment=cfg.victim.augment,
        train_seed=seeds["train"],
    )
    dm.setup()
    return dm


def record_settings(cfg: DictConfig, run_dir: Path, seeds: dict[str, int]) -> None:
    values: dict[str, Any] = {f"seeds/{k}": v for k, v in seeds.items()}
    for group in RECORDED_CONFIG:
        values.update(flatten(f"config/{group}", OmegaConf.to_container(cfg[group], resolve=True)))
    values["run/experiment"] = cfg.experiment
    values["run/dir"] = str(run_dir)
    values.update(git_state())
    update_metrics(run_dir, values)


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Run the stages named in ``cfg.stages`` and return the run's metrics."""
    from radmark.detection.api import detect
    from radmark.marking.api import mark
    from radmark.marking.network import is_rank_zero
    from radmark.victim.train import train_victim

    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = resolve_seeds(cfg.seeds)
    record_settings(cfg, run_dir, seeds)
    logger = make_logger(cfg.logger, run_dir, run_name=f"{cfg.experiment}-{run_dir.name}", config=cfg,
                         group=cfg.logger.group or sweep_group())
    start = time.perf_counter()
    try:
        dm = make_datamodule(cfg, seeds)
        update_metrics(run_dir, {"data/fingerprint": dm.split_fingerprint(),
                                 **{f"data/n_{k}": v for k, v in dm.split_sizes().items()}})
        marked = mark(cfg, dm, run_dir, logger=logger)
        victim = None
        if "victim" in cfg.stages:
            # `victim.init=marking_net` (linear probe / fine-tune of the marking network) needs its checkpoint.
            victim = train_victim(cfg, dm, marked.dataset, run_dir, logger=logger,
                                  init_checkpoint=marked.marking_net_path)
        # Under DDP every rank runs this function; the test needs one process only.
        if "detect" in cfg.stages and victim is not None and is_rank_zero():
            detect(cfg, dm, marked, victim.checkpoint, run_dir, logger=logger)
        metrics = update_metrics(run_dir, {"run/seconds": round(time.perf_counter() - start, 2)})
    finally:
        finish_logger(logger)
    print(summary_line(metrics, run_dir))
    return metrics


def sweep_group() -> str | None:
    """In a Hydra multirun, the sweep folder's name: every job of one sweep lands in one W&B group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def summary_line(metrics: dict[str, Any], run_dir: Path) -> str:
    """One line a person reads at the end of a run."""
    parts = []
    for key, label, fmt in (
        ("marking/fraction", "marked", "{:.0%}"),
        ("marking/psnr_mean", "PSNR", "{:.1f} dB"),
        ("victim/test_acc", "acc", "{:.2%}"),
        ("detect/whitebox_log10_p", "white-box log10 p", "{:.2f}"),
        ("detect/blackbox_log10_p", "black-box log10 p", "{:.2f}"),
    ):
        if metrics.get(key) is not None:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    return "radmark: " + ", ".join(parts) + f" | run dir {run_dir}"
