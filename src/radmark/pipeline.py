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
from radmark.plots import marked_examples_png

log = logging.getLogger(__name__)

# Settings recorded in every metrics.json (tables are built from these, never from folder names).
RECORDED_CONFIG = ("data", "marking", "victim", "detection")
EXAMPLES_PNG = "marked_examples.png"


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
        values.update(flatten(f"config/{group}", OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True)))
    values["run/experiment"] = cfg.experiment
    values["run/variant"] = variant_label(cfg)
    values["run/command"] = command_line()
    values["run/dir"] = str(run_dir)
    values.update(git_state())
    update_metrics(run_dir, values)


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Run the stages named in ``cfg.stages`` and return the run's metrics.

    Under DDP every rank runs this function (Lightning re-launches the command); only rank 0 writes
    metrics, figures and runs the detection tests, which need one process.
    """
    from radmark.detection.api import detect
    from radmark.marking.api import mark
    from radmark.marking.network import is_rank_zero
    from radmark.victim.train import train_victim

    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = resolve_seeds(cfg.seeds)
    main_process = is_rank_zero()
    if main_process:
        record_settings(cfg, run_dir, seeds)
    logger = make_logger(cfg.logger, run_dir, run_name=f"{cfg.experiment}-{run_dir.name}", config=cfg,
                         group=cfg.logger.group or sweep_group())
    start = time.perf_counter()
    try:
        dm = make_datamodule(cfg, seeds)
        if main_process:
            update_metrics(run_dir, {"data/fingerprint": dm.split_fingerprint(),
                                     **{f"data/n_{k}": v for k, v in dm.split_sizes().items()}})
        marked = mark(cfg, dm, run_dir, logger=logger)
        if main_process:
            examples = marked_examples_png(dm.dataset("private"), marked.dataset, marked.marked_indices,
                                           run_dir / EXAMPLES_PNG)
            update_metrics(run_dir, {"marking/examples_png": str(examples) if examples else None})
        victim = None
        if "victim" in cfg.stages:
            # `victim.init=marking_net` (linear probe / fine-tune of the marking network) needs its checkpoint.
            victim = train_victim(cfg, dm, marked.dataset, run_dir, logger=logger,
                                  init_checkpoint=marked.marking_net_path)
        if "detect" in cfg.stages and victim is not None and main_process:
            detect(cfg, dm, marked, victim.checkpoint, run_dir, logger=logger)
    finally:
        finish_logger(logger)
    if not main_process:
        return {}
    metrics = update_metrics(run_dir, {"run/seconds": round(time.perf_counter() - start, 2)})
    print(summary(metrics, run_dir))
    return metrics


def variant_label(cfg: DictConfig) -> str:
    """The marking/detection recipe in one string: rows of the power table are grouped by it."""
    from radmark.report import variant_of

    values = {}
    for group in ("marking", "detection"):
        values.update(flatten(f"config/{group}", OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True)))
    return variant_of(values)


def command_line() -> str:
    """The command that reproduces this run (the job's own overrides in a sweep)."""
    import sys

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "(called from Python: " + " ".join(sys.argv) + ")"
    hc = HydraConfig.get()
    module = "radmark.detection.calibrate" if "calibrate" in hc.job.name else "radmark.run"
    return " ".join(["python -m", module, *hc.overrides.task])


def sweep_group() -> str | None:
    """In a Hydra multirun, the sweep folder's name: every job of one sweep lands in one W&B group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def summary(metrics: dict[str, Any], run_dir: Path) -> str:
    """The plain summary a person reads at the end of a run: numbers first, then where things are."""

    def fmt(key: str, spec: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else spec.format(value)

    lines = [
        f"radmark run {metrics.get('run/experiment', '')}: {fmt('run/seconds', '{:.0f}')} s",
        f"  marked      {fmt('marking/n_marked', '{}')} of {fmt('marking/n_private', '{}')} private images "
        f"({fmt('marking/fraction', '{:.0%}')}), PSNR {fmt('marking/psnr_mean', '{:.1f}')} dB "
        f"(min {fmt('marking/psnr_min', '{:.1f}')}), L-inf {fmt('marking/linf_max', '{:.0f}')}/255",
        f"  victim      {fmt('victim/arch', '{}')} ({fmt('victim/mode', '{}')}), test accuracy "
        f"{fmt('victim/test_acc', '{:.2%}')}, train accuracy {fmt('victim/train_acc', '{:.2%}')}",
        f"  white-box   log10 p = {fmt('detect/whitebox_log10_p', '{:.2f}')} "
        f"(mean cosine {fmt('detect/whitebox_cos_mean', '{:.3f}')})",
        f"  black-box   log10 p = {fmt('detect/blackbox_log10_p', '{:.2f}')} "
        f"({fmt('detect/blackbox_wins', '{}')} of {fmt('detect/blackbox_n', '{}')} twins favour the released copy)",
        "  (log10 p <= -4 means p <= 1e-4: such a mark in a model that never saw the data happens once in 10,000)",
        f"  key         {run_dir / 'key.safetensors'} (sha256 {fmt('marking/key_sha256', '{}')})",
        f"  marked data {fmt('marking/marked_dir', '{}')}",
        f"  suspect     {fmt('detect/suspect', '{}')}",
        f"  figures     {fmt('marking/examples_png', '{}')}",
        f"  metrics     {run_dir / 'metrics.json'}",
    ]
    return "\n".join(lines)
