"""Detection stage: both tests on one suspect, for the pipeline (:func:`detect`) and the third-party CLI.

The building blocks (:func:`marking_view`, :func:`load_suspect`, :func:`twin_pairs`, :func:`run_tests`)
take a loaded key and explicit paths, so :mod:`radmark.detection.cli` and
:mod:`radmark.detection.calibrate` reuse them without a Hydra config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset, Subset

from radmark.detection.blackbox import TwinPairs, twin_losses, twin_test
from radmark.detection.probes import make_probes, probe_settings, torch_device
from radmark.detection.whitebox import NetView, detection_trainer, whitebox_detect
from radmark.io import read_json, sha256_file, write_json
from radmark.metrics import update_metrics
from radmark.models import get_classifier, load_checkpoint

log = logging.getLogger(__name__)

PER_CLASS_FILE = "detect_per_class.json"


class DetectionInputError(ValueError):
    """A key / model / data mismatch the user can fix (the CLI turns it into exit code 2)."""


# ---------------------------------------------------------------------------------- building blocks


def marking_view(key: Any, marking_net_path: str | Path | None = None) -> NetView:
    """The marking network named by ``key`` (checksum verified), with the normalisation it was marked with.

    ``marking_net_path`` overrides the checkpoint path recorded in the key (e.g. the key moved to another
    machine); the sha256 must still match.
    """
    from radmark.marking.network import load_marking_network

    where = f"key {key.path}" if getattr(key, "path", None) else "the key"
    try:
        info = dict(key.meta["marking_net"])
    except (KeyError, TypeError) as err:
        raise DetectionInputError(f"{where} has no 'marking_net' metadata: not a radmark key?") from err
    if marking_net_path is not None:
        info["checkpoint"] = str(marking_net_path)
    try:
        phi = load_marking_network({**key.meta, "marking_net": info})
    except FileNotFoundError as err:
        raise DetectionInputError(
            f"{err}. Fix: pass the marking network's checkpoint with --marking-net PATH "
            f"(sha256 {info.get('checkpoint_sha256')})"
        ) from err
    except ValueError as err:
        raise DetectionInputError(f"{err} (named by {where})") from err
    if phi.dim != key.feature_dim:
        raise DetectionInputError(
            f"{where}: carriers have dimension {key.feature_dim} but the marking network "
            f"{info['checkpoint']} has {phi.dim}-d features: the key does not belong to this network"
        )
    return NetView(phi.model, phi.classifier, info["mean"], info["std"], info.get("image_size"))


def load_suspect(
    path: str | Path, arch: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A suspect checkpoint: radmark's format (state_dict + .json) or a plain torchvision state_dict
    (then ``arch`` is required). ``num_classes``: the key's class count, checked against the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise DetectionInputError(f"suspect checkpoint {path} not found")
    try:
        model, meta = load_checkpoint(path, arch=arch)
    except (ValueError, KeyError) as err:
        hint = "" if arch else " Fix: name its architecture with --arch (resnet18 | vgg16 | densenet121)."
        raise DetectionInputError(f"cannot load suspect {path}: {err}.{hint}") from err
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise DetectionInputError(
            f"suspect {path} has {meta['num_classes']} output classes but the key has {num_classes} "
            "carriers (one per class): this model was not trained on the marked dataset's label set, or the "
            "wrong key / checkpoint was given. Fix: pass the key of the dataset this model was trained on."
        )
    return model.eval(), meta


def suspect_view(
    model: nn.Module,
    meta: dict[str, Any] | None,
    classifier_module: str | None,
    default_mean: Any,
    default_std: Any,
    default_image_size: int | None = None,
) -> NetView:
    """The suspect's input recipe: its checkpoint metadata where recorded, else the marked data's."""
    meta = meta or {}
    name = classifier_module or meta.get("classifier")
    try:
        layer = get_classifier(model, name, meta.get("arch") if name is None else None)
    except ValueError as err:
        raise DetectionInputError(f"suspect: {err}") from err
    if name is None:
        name = next(n for n, m in model.named_modules() if m is layer)
    return NetView(
        model,
        name,
        meta.get("mean") or list(default_mean),
        meta.get("std") or list(default_std),
        meta.get("image_size") or default_image_size,
    )


def twin_pairs(marked_dir: str | Path, key: Any) -> TwinPairs:
    """The released/twin pairs of ``marked_dir``, checked to belong to ``key``."""
    marked_dir = Path(marked_dir)
    try:
        pairs = TwinPairs(marked_dir)
    except (FileNotFoundError, ValueError) as err:
        raise DetectionInputError(str(err)) from err
    done = marked_dir / "DONE.json"
    if done.is_file() and getattr(key, "path", None):
        recorded = read_json(done).get("key_sha256")
        if recorded and recorded != sha256_file(key.path):
            raise DetectionInputError(
                f"{marked_dir} was marked with another key (sha256 {recorded}) than {key.path}: pass the "
                "marked dir of this key with --marked-dir"
            )
    indices = sorted(int(r["index"]) for r in pairs.rows)
    if indices != sorted(int(i) for i in key.marked_indices.tolist()):
        raise DetectionInputError(
            f"{marked_dir / 'manifest.csv'} lists {len(indices)} marked images that are not the key's "
            f"{key.n_marked}: the marked dir does not belong to this key"
        )
    return pairs


def run_tests(
    key: Any,
    marking: NetView,
    suspect: NetView,
    heldout: Dataset | None,
    n_heldout: int,
    pairs: TwinPairs | None,
    whitebox: bool = True,
    blackbox: bool = True,
    accelerator: str = "auto",
    blackbox_reason: str | None = None,
    align_probes: int = 0,
    blackbox_views: int = 1,
    seed: int = 0,
    blackbox_stat: str = "sign",
) -> dict[str, Any]:
    """Both tests. Returns ``{"whitebox": dict | None, "blackbox": dict | None, "blackbox_reason": str |
    None, "seconds": float}``; a test that did not run has a reason instead of a result.

    ``align_probes`` / ``blackbox_views`` / ``blackbox_stat``: ``detection.*`` (0 / 1 / sign: the paper); ``seed`` (``seeds.detection``)
    draws the probes' carriers and the black-box views, never the key.
    """
    start = time.perf_counter()
    n_out = get_classifier(suspect.model, suspect.classifier).out_features
    if n_out != key.num_classes:
        raise DetectionInputError(
            f"the suspect's classifier {suspect.classifier!r} has {n_out} outputs but the key has "
            f"{key.num_classes} classes: wrong key, wrong checkpoint or wrong --classifier-module"
        )
    trainer = detection_trainer(accelerator)
    out: dict[str, Any] = {"whitebox": None, "blackbox": None, "blackbox_reason": blackbox_reason}
    if whitebox:
        if heldout is None:
            raise DetectionInputError("the white-box test needs the held-out split")
        probes = None
        if align_probes > 0:
            n_clean = min(int(n_heldout), len(heldout))  # type: ignore[arg-type]
            probes = make_probes(marking, Subset(heldout, range(n_clean)), int(align_probes), seed,
                                 probe_settings(key), key.basis, torch_device(accelerator))
        out["whitebox"] = whitebox_detect(
            marking, suspect, key.carriers, heldout, n_heldout, trainer=trainer, basis=key.basis, probes=probes
        )
    if blackbox:
        if not key.twins:
            out["blackbox_reason"] = "the key has no twins (marking.twins=false): no exact black-box test"
        elif pairs is None:
            out["blackbox_reason"] = out["blackbox_reason"] or "no marked dir with released/twin images given"
        else:
            rel, twin = twin_losses(suspect, pairs, trainer=trainer, views=blackbox_views, seed=seed)
            out["blackbox"] = {**twin_test(rel, twin, blackbox_stat), "views": int(blackbox_views)}
            out["blackbox_reason"] = None
    elif out["blackbox_reason"] is None:
        out["blackbox_reason"] = "disabled (detection.blackbox=false)"
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def summary_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The ``detect/*`` metrics of a :func:`run_tests` result (None for a test that did not run)."""
    wb, bb = result["whitebox"], result["blackbox"]
    return {
        "detect/whitebox_log10_p": wb["log10_p"] if wb else None,
        "detect/whitebox_cos_mean": wb["cos_mean"] if wb else None,
        "detect/whitebox_n_heldout": wb["n_heldout"] if wb else None,
        "detect/whitebox_n_probes": wb.get("n_probes", 0) if wb else None,
        "detect/blackbox_log10_p": bb["log10_p"] if bb else None,
        "detect/blackbox_wins": bb["wins"] if bb else None,
        "detect/blackbox_n": bb["n"] if bb else None,
        "detect/blackbox_ties": bb["ties"] if bb else None,
        "detect/blackbox_views": bb.get("views", 1) if bb else None,
        "detect/blackbox_stat": bb.get("statistic", "sign") if bb else None,
        # The sign test's p-value is kept beside a signed-rank result, for comparison across variants.
        "detect/blackbox_sign_log10_p": bb.get("sign_log10_p", bb["log10_p"]) if bb else None,
        "detect/blackbox_reason": result.get("blackbox_reason"),
        "detect/seconds": result["seconds"],
    }


def per_class_report(result: dict[str, Any], classes: list[str] | None = None) -> dict[str, Any]:
    """Per-class cosines and log10 p of the white-box test (for ``detect_per_class.json``)."""
    wb = result["whitebox"]
    if wb is None:
        return {"whitebox": None}
    n = len(wb["cosines"])
    names = classes if classes and len(classes) == n else [str(k) for k in range(n)]
    return {
        "classes": names,
        "cosines": wb["cosines"],
        "log10_p": wb["per_class_log10_p"],
        "whitebox_log10_p": wb["log10_p"],
        "cos_mean": wb["cos_mean"],
        "d": wb["d"],
        "d_suspect": wb["d_suspect"],
        "n_heldout": wb["n_heldout"],
        "n_probes": wb.get("n_probes", 0),
    }


# ---------------------------------------------------------------------------------- pipeline stage


def detect(
    cfg: Any,
    datamodule: Any,
    marking_result: Any,
    suspect_checkpoint: Path,
    run_dir: Path,
    logger: Any = None,
) -> dict[str, Any]:
    """Run the tests enabled in ``cfg.detection`` on ``suspect_checkpoint``; writes ``detect/*`` metrics
    and ``<run_dir>/detect_per_class.json``; returns the metrics."""
    from radmark.config import choice_name, resolve_seeds
    from radmark.marking.key import load_key

    run_dir = Path(run_dir)
    dcfg = cfg.detection
    key = getattr(marking_result, "key", None) or load_key(marking_result.key_path)
    marking = marking_view(key)
    model, meta = load_suspect(suspect_checkpoint, num_classes=key.num_classes)
    suspect = suspect_view(model, meta, dcfg.classifier_module, datamodule.mean, datamodule.std,
                           datamodule.image_size)
    pairs = twin_pairs(marking_result.marked_dir, key) if (dcfg.blackbox and key.twins) else None
    result = run_tests(
        key, marking, suspect, datamodule.dataset("heldout"), int(dcfg.n_heldout), pairs,
        whitebox=bool(dcfg.whitebox), blackbox=bool(dcfg.blackbox), accelerator=str(cfg.trainer.accelerator),
        align_probes=int(dcfg.align_probes), blackbox_views=int(dcfg.blackbox_views),
        seed=resolve_seeds(cfg.seeds)["detection"], blackbox_stat=choice_name(dcfg.blackbox_stat),
    )
    metrics = summary_metrics(result)
    metrics["detect/suspect"] = str(suspect_checkpoint)
    report = per_class_report(result, datamodule.classes)
    report["suspect"] = str(suspect_checkpoint)
    report["key_sha256"] = getattr(marking_result, "key_sha256", None)
    write_json(run_dir / PER_CLASS_FILE, report)
    update_metrics(run_dir, metrics)
    if logger is not None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        logger.log_metrics(numeric)
    if result["blackbox_reason"]:
        log.info("black-box test not run: %s", result["blackbox_reason"])
    return metrics
