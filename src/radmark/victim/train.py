"""Train the suspect ("victim") the way a data user would: on the private split with the marked copies in
place of their originals, from scratch, by fine-tuning, as a linear probe, or by distillation.

Output (under ``run_dir``): ``victim/suspect.pt`` + ``victim/suspect.json`` (plain state_dict, readable by
detection without radmark's classes), ``victim/last.ckpt`` (Lightning, for resume) and ``victim/*`` keys in
``metrics.json``.
"""

from __future__ import annotations

import logging
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from torch import nn

from radmark.classifier import ClassifierModule
from radmark.config import config_hash, resolve_seeds
from radmark.io import read_json, write_json
from radmark.metrics import read_metrics, update_metrics
from radmark.models import (
    build_model,
    classifier_name,
    load_checkpoint,
    load_pretrained,
    read_meta,
    save_checkpoint,
)
from radmark.trainer import make_trainer
from radmark.victim.module import DistillModule, LinearProbeModule, replace_classifier

log = logging.getLogger(__name__)

MODES = ("scratch", "finetune", "linear", "distill")
VICTIM_DIR = "victim"
CHECKPOINT_NAME = "suspect.pt"
LIGHTNING_NAME = "last"  # -> last.ckpt
RESUME_STAMP = "resume.json"
# The progress bar reads (and so synchronises) the logged tensors on every refresh; every step costs a
# device sync on GPU. Ten steps keep the bar lively at a negligible cost.
PROGRESS_REFRESH = 10


@dataclass
class VictimResult:
    """What :func:`train_victim` produced. ``model`` is the trained network (eval mode), for in-process use."""

    checkpoint: Path
    lightning_checkpoint: Path | None
    metrics: dict[str, Any]
    model: nn.Module | None = field(default=None, repr=False, compare=False)


@dataclass
class BuiltVictim:
    module: ClassifierModule
    arch: str
    small_input: bool
    sources: dict[str, str]  # resolved victim.init / victim.teacher (recorded and part of the resume key)


# ---------------------------------------------------------------------- building the system per mode


def _source(value: str | Path) -> str:
    return "imagenet" if str(value) == "imagenet" else str(Path(value).expanduser().resolve())


def _resolve_init(vcfg: DictConfig, init_checkpoint: str | Path | None) -> str:
    init = vcfg.init
    if init == "marking_net" or (init is None and init_checkpoint is not None):
        if init_checkpoint is None:
            raise ValueError(
                "victim.init=marking_net needs the marking network's checkpoint: pass init_checkpoint= to "
                "train_victim (the pipeline does), or set victim.init to its path"
            )
        return _source(init_checkpoint)
    if init is None:
        raise ValueError(
            f"victim.mode={vcfg.mode} needs victim.init: a checkpoint path, 'imagenet' or 'marking_net'"
        )
    return _source(init)


def _resolve_teacher(vcfg: DictConfig, teacher_checkpoint: str | Path | None) -> str:
    configured = vcfg.teacher
    if configured is not None and teacher_checkpoint is not None:
        if _source(configured) != _source(teacher_checkpoint):
            raise ValueError(
                f"two teachers: victim.teacher={configured} and teacher_checkpoint={teacher_checkpoint}; "
                "give one"
            )
    chosen = configured if configured is not None else teacher_checkpoint
    if chosen is None:
        raise ValueError(
            "victim.mode=distill needs a teacher trained on the marked data: set victim.teacher=PATH "
            "(a radmark checkpoint) or pass teacher_checkpoint= to train_victim"
        )
    return _source(chosen)


def _check_preprocessing(path: str, cfg: DictConfig) -> None:
    """Warn when a loaded network was trained on differently normalised or sized inputs."""
    meta = read_meta(path) or {}
    data = cfg.data
    for key, ours in (("mean", list(data.mean)), ("std", list(data.std)), ("image_size", data.image_size)):
        theirs = meta.get(key)
        if theirs is not None and theirs != ours:
            log.warning("%s was trained with %s=%s but data.%s=%s", path, key, theirs, key, ours)


def _load_checked(path: str, what: str, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    try:
        return load_checkpoint(path, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{what}: {err}") from err


def build_victim(
    cfg: DictConfig,
    init_checkpoint: str | Path | None = None,
    teacher_checkpoint: str | Path | None = None,
) -> BuiltVictim:
    """The Lightning system for ``cfg.victim.mode`` (see :func:`train_victim`). Draws from torch's global
    RNG (fresh layers), so seed before calling."""
    v = cfg.victim
    num_classes = int(cfg.data.num_classes)
    arch, small_input = str(v.arch), bool(v.small_input)
    opt: dict[str, Any] = dict(
        lr=float(v.lr),
        momentum=float(v.momentum),
        weight_decay=float(v.weight_decay),
        epochs=int(v.epochs),
        schedule=str(v.schedule),
        step_every=int(v.step_every),
        step_gamma=float(v.step_gamma),
        prefix="victim",
    )
    mode = v.mode
    if mode == "scratch":
        model = build_model(arch, num_classes, small_input=small_input)
        return BuiltVictim(ClassifierModule(model, num_classes, **opt), arch, small_input, {})

    if mode == "finetune":
        init = _resolve_init(v, init_checkpoint)
        if init == "imagenet":
            model, _ = load_pretrained(arch, "imagenet", num_classes, small_input, config_key="victim.init")
        else:
            _check_preprocessing(init, cfg)
            model, meta = _load_checked(
                init, f"victim.init={init} (victim.arch={arch}, victim.small_input={small_input})",
                arch=arch, small_input=small_input,
            )
            if meta["num_classes"] != num_classes:
                log.info("victim.init has %d classes; new %d-way head", meta["num_classes"], num_classes)
                replace_classifier(model, classifier_name(arch), num_classes)
        return BuiltVictim(ClassifierModule(model, num_classes, **opt), arch, small_input, {"init": init})

    if mode == "linear":
        init = _resolve_init(v, init_checkpoint)
        if init == "imagenet":
            model, skipped = load_pretrained(arch, "imagenet", num_classes, small_input, config_key="victim.init")
            head = classifier_name(arch)
            body_missing = [k for k in skipped if not k.startswith(head + ".")]
            if body_missing:
                raise ValueError(
                    f"victim.mode=linear on ImageNet {arch} weights: {len(body_missing)} body tensors do not "
                    f"fit (e.g. {body_missing[0]}) and would stay random and frozen; use "
                    "victim.small_input=false"
                )
        else:
            _check_preprocessing(init, cfg)
            model, meta = _load_checked(init, f"victim.init={init}")
            if meta["arch"] != arch or meta["small_input"] != small_input:
                log.info(
                    "linear probe on %s (small_input=%s) from victim.init; victim.arch=%s is not used",
                    meta["arch"], meta["small_input"], arch,
                )
            arch, small_input = str(meta["arch"]), bool(meta["small_input"])
        head = classifier_name(arch)
        replace_classifier(model, head, num_classes)  # a new head, even when the class count matches
        module = LinearProbeModule(model, num_classes, classifier=head, **opt)
        return BuiltVictim(module, arch, small_input, {"init": init})

    if mode == "distill":
        teacher_path = _resolve_teacher(v, teacher_checkpoint)
        _check_preprocessing(teacher_path, cfg)
        teacher, tmeta = _load_checked(teacher_path, f"teacher {teacher_path}")
        if tmeta["num_classes"] != num_classes:
            raise ValueError(
                f"teacher {teacher_path} has {tmeta['num_classes']} classes, data.num_classes={num_classes}"
            )
        student = build_model(arch, num_classes, small_input=small_input)
        distill = DistillModule(student, num_classes, teacher, temperature=float(v.temperature), **opt)
        return BuiltVictim(distill, arch, small_input, {"teacher": teacher_path})

    raise ValueError(f"victim.mode={mode!r} is unknown; choose one of {', '.join(MODES)}")


# ---------------------------------------------------------------------- trainer


class ThroughputMeter(pl.Callback):
    """Images seen and seconds spent in training epochs (checkpoint writes at epoch end excluded:
    Lightning runs ModelCheckpoint after the other callbacks)."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.images += int(batch[1].shape[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.images and self.seconds > 0 else None


def _steps_per_epoch(n_batches: int, limit: Any) -> int:
    if limit is None:
        return n_batches
    if isinstance(limit, int) or float(limit) > 1:
        return min(n_batches, int(limit))
    return max(1, int(n_batches * float(limit)))


def make_victim_trainer(
    trainer_cfg: DictConfig,
    root_dir: Path,
    epochs: int,
    steps_per_epoch: int,
    logger: Any = None,
    checkpoint_dir: Path | None = None,
    callbacks: list[pl.Callback] | None = None,
) -> pl.Trainer:
    """The Trainer train_victim uses (also what ``bench/bench_train.py`` measures)."""
    callbacks = list(callbacks or [])
    if checkpoint_dir is not None:
        # One file, overwritten every epoch: what a resume needs, nothing more.
        callbacks.append(
            ModelCheckpoint(
                dirpath=checkpoint_dir, filename=LIGHTNING_NAME, monitor=None, save_top_k=1,
                enable_version_counter=False, save_on_train_epoch_end=True,
            )
        )
    if trainer_cfg.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=PROGRESS_REFRESH))
    return make_trainer(
        trainer_cfg,
        root_dir,
        max_epochs=epochs,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=checkpoint_dir is not None,
        log_every_n_steps=max(1, min(10, steps_per_epoch)),
    )


def _resume_from(vdir: Path, fingerprint: str) -> Path | None:
    """``last.ckpt`` if it was written by a run with the same settings, else None (a stale one is removed)."""
    last = vdir / f"{LIGHTNING_NAME}.ckpt"
    stamp = vdir / RESUME_STAMP
    previous = read_json(stamp).get("fingerprint") if stamp.exists() else None
    if last.exists():
        # torch.save writes a zip; a write cut short leaves no central directory.
        if previous == fingerprint and zipfile.is_zipfile(last):
            log.info("resuming victim training from %s", last)
            return last
        log.warning("%s is from other settings or incomplete; training from the start", last)
        last.unlink(missing_ok=True)
    write_json(stamp, {"fingerprint": fingerprint})
    return None


def _scalar(value: Any) -> float | None:
    return None if value is None else float(value)


# ---------------------------------------------------------------------- entry point


def train_victim(
    cfg: DictConfig,
    datamodule: Any,
    train_dataset: Any,
    run_dir: str | Path,
    logger: Any = None,
    init_checkpoint: str | Path | None = None,
    teacher_checkpoint: str | Path | None = None,
) -> VictimResult:
    """Train the victim per ``cfg.victim`` on ``train_dataset`` and report top-1 on the test split.

    ``victim.mode``: ``scratch`` (random init), ``finetune`` (all layers, from ``victim.init``: a checkpoint,
    ``imagenet`` or ``marking_net``), ``linear`` (new head on the frozen network ``victim.init``; its
    BatchNorm statistics frozen too), ``distill`` (student ``victim.arch`` from scratch on the soft outputs
    of the teacher ``victim.teacher`` / ``teacher_checkpoint``). ``init_checkpoint`` is the marking
    network's checkpoint, used for ``victim.init=marking_net``.

    Randomness comes from ``seeds.train`` only (init, data order, augmentation); the datamodule's splits
    and the marking seeds are never touched. A matching ``victim/last.ckpt`` in ``run_dir`` is resumed.
    """
    v = cfg.victim
    if v.mode not in MODES:
        raise ValueError(f"victim.mode={v.mode!r} is unknown; choose one of {', '.join(MODES)}")
    run_dir = Path(run_dir)
    vdir = run_dir / VICTIM_DIR
    vdir.mkdir(parents=True, exist_ok=True)
    seeds = resolve_seeds(cfg.seeds)

    datamodule.setup()
    datamodule.train_dataset = train_dataset
    datamodule.train_seed = seeds["train"]  # data order only: the splits depend on the split seed alone
    pl.seed_everything(seeds["train"], workers=True, verbose=False)
    built = build_victim(cfg, init_checkpoint, teacher_checkpoint)
    module = built.module

    train_loader = datamodule.loader(train_dataset, train=True, augment=v.augment, batch_size=v.batch_size)
    test_loader = datamodule.loader("test", train=False, batch_size=v.batch_size)
    limit = cfg.trainer.limit_train_batches
    fingerprint = config_hash(
        cfg.victim, cfg.data, cfg.get("marking"), seeds,
        {"limit_train_batches": limit, "sources": built.sources, "n_train": len(train_dataset)},
    )
    resume = _resume_from(vdir, fingerprint)

    meter = ThroughputMeter()
    trainer = make_victim_trainer(
        cfg.trainer, vdir, int(v.epochs), _steps_per_epoch(len(train_loader), limit),
        logger=logger, checkpoint_dir=vdir, callbacks=[meter],
    )
    module.train()
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Frozen parts (linear probe body, distillation teacher) are in eval mode on purpose.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
        # Our own resume stamp sits beside last.ckpt; the test split is evaluated once, after training.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=r".*validation_step.* but have no `val_dataloader`")
        trainer.fit(module, train_dataloaders=train_loader, ckpt_path=resume)
    train_seconds = time.perf_counter() - start
    train_acc = _scalar(trainer.callback_metrics.get("victim/train_acc"))
    train_acc = None if train_acc is None else round(train_acc, 6)
    tested = trainer.test(module, dataloaders=test_loader, verbose=False)
    test_acc = round(float(tested[0]["victim/test_acc"]), 6)
    model = module.model.eval()

    metrics: dict[str, Any] = {
        "victim/test_acc": test_acc,
        "victim/train_acc": train_acc,
        "victim/train_seconds": round(train_seconds, 3),
        "victim/images_per_s": None if meter.images_per_s is None else round(meter.images_per_s, 1),
        "victim/epochs": int(trainer.current_epoch),
        "victim/mode": str(v.mode),
        "victim/arch": built.arch,
        "victim/small_input": built.small_input,
        "victim/n_train": len(train_dataset),
        "victim/resumed": resume is not None,
        "victim/init": built.sources.get("init"),
        "victim/teacher": built.sources.get("teacher"),
    }
    if meter.images == 0 and resume is not None:
        # Resumed a finished run: nothing trained now, keep what the run that trained measured.
        previous = read_metrics(run_dir)
        for key in ("victim/train_acc", "victim/train_seconds", "victim/images_per_s"):
            metrics[key] = previous.get(key, metrics[key])

    checkpoint = vdir / CHECKPOINT_NAME
    lightning_checkpoint = vdir / f"{LIGHTNING_NAME}.ckpt"
    if trainer.is_global_zero:
        meta = {
            "arch": built.arch,
            "num_classes": int(cfg.data.num_classes),
            "small_input": built.small_input,
            "image_size": int(datamodule.image_size),
            "mean": list(datamodule.mean),
            "std": list(datamodule.std),
            "classifier": classifier_name(built.arch),
            "mode": str(v.mode),
            "epochs": metrics["victim/epochs"],
            "train_seed": seeds["train"],
            "test_acc": test_acc,
            **built.sources,
        }
        save_checkpoint(model, checkpoint, meta)
        metrics["victim/checkpoint"] = str(checkpoint)
        update_metrics(run_dir, metrics)
    return VictimResult(
        checkpoint=checkpoint,
        lightning_checkpoint=lightning_checkpoint if lightning_checkpoint.exists() else None,
        metrics=metrics,
        model=model,
    )
