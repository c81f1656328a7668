"""``mark``: the owner's job. Marking network -> key -> selection -> marked PNG shards -> manifest.

Everything is cached under ``paths.cache_dir`` by a hash of what decides it, so sweeps and re-runs reuse the
marking network and finished marked dirs, and an interrupted marking resumes at the first unfinished shard.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from radmark.config import config_hash, resolve_seeds
from radmark.io import atomic_path, read_json, sha256_file, write_json
from radmark.marking.dataset import MarkedDataset
from radmark.marking.key import Key, key_bytes, keys_equal, load_key, make_key, parse_carriers, pca_basis
from radmark.marking.module import MarkingModule, MarkingSettings, ShardDataset, first_item, shard_ranges
from radmark.marking.network import (
    CHECKPOINT_NAME,
    barrier,
    get_marking_network,
    is_rank_zero,
    marking_net_dir,
)
from radmark.marking.selection import check_selection, select_marked
from radmark.marking.writer import (
    DONE,
    MANIFEST,
    ShardWriter,
    finished_shards,
    read_records,
    write_manifest,
)
from radmark.metrics import update_metrics
from radmark.models import FeatureExtractor, read_meta

log = logging.getLogger(__name__)

MARKING_VERSION = 1  # bump when the marking algorithm or file layout changes: invalidates cached marked dirs
KEY_FILE = "key.safetensors"


@dataclass
class MarkingResult:
    """What the later stages need. ``dataset`` is the private split with the marked copies in place."""

    key_path: Path
    key_sha256: str
    marked_dir: Path
    manifest_path: Path
    marking_net_path: Path
    dataset: MarkedDataset
    metrics: dict[str, Any]
    key: Key
    marked_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reused: bool = False


def marked_dir_for(cfg: DictConfig, seeds: dict[str, int], net_sha256: str) -> Path:
    """``<cache>/marked/<hash>``: hash of the marking config, the key/selection/marking/split seeds, the data
    config and the marking network's content. Not the trainer: 1 or N processes give the same files."""
    digest = config_hash(
        cfg.marking, seeds["key"], seeds["selection"], seeds["marking"], cfg.data, seeds["splits"],
        net_sha256, {"version": MARKING_VERSION},
    )
    return Path(cfg.paths.cache_dir) / "marked" / digest


def mark(cfg: DictConfig, datamodule: Any, run_dir: str | Path, logger: Any = None) -> MarkingResult:
    """Mark ``marking.fraction`` of the private split (see module docstring); returns a :class:`MarkingResult`
    and writes the ``marking/*`` and ``marking_net/*`` metrics of ``run_dir/metrics.json``."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    seeds = resolve_seeds(cfg.seeds)
    mcfg = cfg.marking
    settings = MarkingSettings.from_cfg(mcfg)  # validates the numbers before anything expensive
    hard_cap = None if mcfg.get("hard_cap") is None else float(mcfg.hard_cap)
    check_selection(str(mcfg.selection), float(mcfg.fraction), hard_cap)
    if settings.method == "noise" and not bool(mcfg.twins):
        raise ValueError("marking.method=noise needs marking.twins=true: a noise mark is only tested against its "
                         "twin (black-box sign test). Fix: drop marking.twins=false or use marking.method=carrier")
    pca_k = parse_carriers(str(mcfg.carriers))

    net_existed = (marking_net_dir(cfg, seeds["splits"]) / CHECKPOINT_NAME).is_file()
    net, net_path = get_marking_network(cfg, datamodule, logger=logger)
    net_meta = read_meta(net_path) or {}
    net_sha = sha256_file(net_path)
    phi = FeatureExtractor(net, net_meta.get("classifier"), arch=net_meta.get("arch"))

    private = datamodule.dataset("private")
    labels = np.asarray(datamodule.labels("private"), dtype=np.int64)
    scores = _true_class_confidence(cfg, datamodule, net) if str(mcfg.selection) == "hard" else None
    marked = select_marked(labels, float(mcfg.fraction), str(mcfg.selection), seeds["selection"], scores,
                           hard_cap)
    basis = None if pca_k is None else pca_basis(_public_features(cfg, datamodule, phi), pca_k)
    key = make_key(
        seeds["key"], int(cfg.data.num_classes), phi.dim, torch.from_numpy(marked),
        torch.from_numpy(labels[marked]), len(private), bool(mcfg.twins),
        _key_meta(cfg, datamodule, seeds, net_path, net_sha, net_meta, phi.dim, len(private), len(marked), pca_k),
        basis=basis,
    )

    marked_dir = marked_dir_for(cfg, seeds, net_sha)
    key_file = marked_dir / KEY_FILE
    if is_rank_zero():
        _write_key(key, key_file)
    barrier()
    key_sha = sha256_file(key_file)
    n_shards = len(shard_ranges(len(marked), int(mcfg.shard_size)))

    done = marked_dir / DONE
    reused = done.is_file() and (marked_dir / MANIFEST).is_file() and _done_matches(done, key_sha, n_shards)
    mark_seconds, n_now = 0.0, 0
    if reused:
        log.info("marking: reusing finished marked dir %s", marked_dir)
    else:
        barrier()  # every rank lists the finished shards from the same state of the disk
        todo = sorted(set(range(n_shards)) - finished_shards(marked_dir, n_shards, key.twins))
        if len(todo) < n_shards:
            log.info("marking: %d of %d shards already done in %s, marking the rest", n_shards - len(todo),
                     n_shards, marked_dir)
        if todo:
            t0 = time.perf_counter()
            _run_marking(cfg, phi, settings, private, key, todo, marked_dir, run_dir, seeds["marking"])
            mark_seconds = time.perf_counter() - t0
            ranges = shard_ranges(len(marked), int(mcfg.shard_size))
            n_now = sum(ranges[k][1] - ranges[k][0] for k in todo)
        barrier()
        if is_rank_zero():
            records = read_records(marked_dir, n_shards)
            manifest = write_manifest(marked_dir, records, key.twins)
            write_json(done, {"key_sha256": key_sha, "n_shards": n_shards, "n_marked": len(marked),
                              "manifest_sha256": sha256_file(manifest), "version": MARKING_VERSION})
        barrier()

    records = read_records(marked_dir, n_shards)
    metrics = _metrics(records, settings, key, len(private), float(mcfg.fraction))
    seconds = time.perf_counter() - start
    rows_per_image = 2 if key.twins else 1
    metrics.update({
        "marking/selection": str(mcfg.selection),
        "marking/carriers": str(mcfg.carriers),
        "marking/twins": bool(key.twins),
        "marking/key_sha256": key_sha,
        "marking/marked_dir": str(marked_dir),
        "marking/reused": bool(reused),
        "marking/shards": n_shards,
        "marking/n_marked_now": n_now,
        "marking/seconds": round(seconds, 3),
        "marking/images_per_s": round(n_now / mark_seconds, 3) if n_now else None,
        "marking/image_steps_per_s": (
            round(n_now * rows_per_image * settings.steps / mark_seconds, 1) if n_now else None
        ),
        "marking_net/path": str(net_path),
        "marking_net/sha256": net_sha,
        "marking_net/arch": net_meta.get("arch"),
        "marking_net/source": net_meta.get("source"),
        "marking_net/test_acc": net_meta.get("test_acc"),
        "marking_net/reused": bool(net_existed),
        "marking_net/train_seconds": net_meta.get("seconds"),
    })
    run_key = run_dir / KEY_FILE
    if is_rank_zero():
        with atomic_path(run_key) as tmp:
            shutil.copyfile(key_file, tmp)
        update_metrics(run_dir, metrics)
        _log_loss_curve(logger, records)
        print(f"radmark: key sha256 {key_sha} ({run_key}); publish this hash with the released data")
    barrier()
    dataset = MarkedDataset(private, marked_dir)
    return MarkingResult(
        key_path=run_key, key_sha256=key_sha, marked_dir=marked_dir, manifest_path=marked_dir / MANIFEST,
        marking_net_path=net_path, dataset=dataset, metrics=metrics, key=load_key(key_file),
        marked_indices=marked, reused=bool(reused),
    )


# ---------------------------------------------------------------- pieces


def _key_meta(cfg: DictConfig, dm: Any, seeds: dict[str, int], net_path: Path, net_sha: str,
              net_meta: dict[str, Any], dim: int, n_private: int, n_marked: int, pca_k: int | None
              ) -> dict[str, Any]:
    """Everything detection needs to rebuild phi's features and interpret the key (no timestamps: the
    key's bytes must be a function of the inputs)."""
    return {
        "marking_net": {
            "arch": net_meta.get("arch"),
            "small_input": net_meta.get("small_input"),
            "num_classes": net_meta.get("num_classes"),
            "classifier": net_meta.get("classifier"),
            "image_size": int(cfg.data.image_size),
            "mean": [float(m) for m in cfg.data.mean],
            "std": [float(s) for s in cfg.data.std],
            "checkpoint": str(Path(net_path).resolve()),
            "checkpoint_sha256": net_sha,
            "feature_dim": int(dim),
            "source": net_meta.get("source"),
        },
        "num_classes": int(cfg.data.num_classes),
        "feature_dim": int(dim),
        "carrier_dim": int(pca_k or dim),
        "carriers": str(cfg.marking.carriers),
        "twins": bool(cfg.marking.twins),
        "selection": {"mode": str(cfg.marking.selection), "fraction": float(cfg.marking.fraction),
                      "hard_cap": cfg.marking.get("hard_cap"),
                      "n_private": int(n_private), "n_marked": int(n_marked)},
        "seeds": {k: int(seeds[k]) for k in ("key", "selection", "marking", "splits")},
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "split_seed": int(seeds["splits"]),
        "split_fingerprint": dm.split_fingerprint(),
        "marking": OmegaConf.to_container(cfg.marking, resolve=True),
        "version": MARKING_VERSION,
    }


def _write_key(key: Key, path: Path) -> None:
    """Write the key unless the same bytes are there; a *different* key in a dir of the same hash is an
    inconsistent cache and stops the run."""
    data = key_bytes(key)
    if path.is_file():
        if path.read_bytes() == data:
            return
        old = load_key(path)
        if not keys_equal(old, key):
            raise RuntimeError(
                f"{path} holds other carriers/selection than this config produces: the marked dir is "
                f"inconsistent; delete {path.parent} and re-run"
            )
        log.info("marking: key metadata changed (e.g. the cache moved); rewriting %s", path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _done_matches(done: Path, key_sha: str, n_shards: int) -> bool:
    try:
        info = read_json(done)
    except ValueError:
        return False
    return info.get("key_sha256") == key_sha and info.get("n_shards") == n_shards


def _device(cfg: DictConfig) -> torch.device:
    if str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def _public_features(cfg: DictConfig, dm: Any, phi: nn.Module) -> torch.Tensor:
    """Centre-view features of the public split (for ``pca:K`` carriers)."""
    device = _device(cfg)
    phi = phi.to(device)
    feats = [phi(x.to(device)).cpu() for x, _, _ in dm.loader("public", train=False,
                                                              batch_size=int(cfg.marking.batch_size))]
    phi.cpu()
    return torch.cat(feats)


@torch.no_grad()
def _true_class_confidence(cfg: DictConfig, dm: Any, net: nn.Module) -> np.ndarray:
    """Softmax probability of the true class under the marking net's own classifier, centre view, for each
    private image (``marking.selection=hard`` marks the lowest first)."""
    device = _device(cfg)
    net = net.to(device).eval()
    out = []
    for x, y, _ in dm.loader("private", train=False, batch_size=int(cfg.marking.batch_size)):
        logits = net(x.to(device)).double()
        if logits.shape[1] != int(cfg.data.num_classes):
            raise ValueError(
                f"marking.selection=hard needs a marking net that classifies the data's "
                f"{cfg.data.num_classes} classes; its classifier has {logits.shape[1]} outputs"
            )
        out.append(logits.softmax(1).gather(1, y.to(device).long()[:, None])[:, 0].cpu())
    net.cpu()
    return torch.cat(out).numpy()


def _run_marking(cfg: DictConfig, phi: nn.Module, settings: MarkingSettings, private: Any, key: Key,
                 todo: list[int], marked_dir: Path, run_dir: Path, marking_seed: int) -> None:
    """The predict loop over the unfinished shards; :class:`ShardWriter` saves each one as it completes."""
    from radmark.trainer import make_trainer

    module = MarkingModule(phi, settings, list(cfg.data.mean), list(cfg.data.std), marking_seed)
    loader = DataLoader(ShardDataset(private, key, todo, int(cfg.marking.shard_size)), batch_size=1,
                        shuffle=False, collate_fn=first_item)
    trainer = make_trainer(
        cfg.trainer, default_root_dir=run_dir, logger=None, callbacks=[ShardWriter(marked_dir)],
        inference_mode=False,  # the loop needs gradients w.r.t. the images
        precision="32-true",  # pixel gradients in fp16 without a loss scaler underflow; also keeps files exact
    )
    log.info("marking: %d shards (%d images each at most), %d steps", len(todo), cfg.marking.shard_size,
             settings.steps)
    trainer.predict(module, dataloaders=loader, return_predictions=False)


def _metrics(records: list[dict[str, Any]], s: MarkingSettings, key: Key, n_private: int,
             fraction: float) -> dict[str, Any]:
    rows = [r for rec in records for r in rec["rows"]]
    out: dict[str, Any] = {
        "marking/n_marked": len(rows),
        "marking/n_private": n_private,
        "marking/fraction": fraction,
        "marking/fraction_marked": len(rows) / n_private if n_private else 0.0,
        "marking/steps": s.steps,
    }

    def col(name: str) -> np.ndarray:
        return np.asarray([r[name] for r in rows], dtype=np.float64)

    if rows:
        out.update({
            "marking/psnr_mean": float(col("psnr").mean()),
            "marking/psnr_min": float(col("psnr").min()),
            "marking/linf_max": float(col("linf").max()),
            "marking/shift_mean": float(col("shift").mean()),
            "marking/cos_mean": float(col("cos").mean()),
        })
        if key.twins:
            out["marking/twin_shift_mean"] = float(col("twin_shift").mean())
            out["marking/twin_cos_mean"] = float(col("twin_cos").mean())
        curve = _loss_curve(records)
        if len(curve):
            out["marking/loss_first"] = float(curve[0, 0])
            out["marking/loss_last"] = float(curve[-1, 0])
    else:
        out.update({k: None for k in ("marking/psnr_mean", "marking/psnr_min", "marking/linf_max",
                                      "marking/shift_mean", "marking/cos_mean")})
    return out


def _loss_curve(records: list[dict[str, Any]]) -> np.ndarray:
    """(steps, 4) mean per optimised image of [loss, -shift, feature distance, squared image distance]."""
    n = sum(rec["n_rows"] for rec in records)
    if not records or not n:
        return np.zeros((0, 4))
    total = sum(np.asarray(rec["loss_terms"], dtype=np.float64).reshape(-1, 4) for rec in records)
    return np.asarray(total) / n


def _log_loss_curve(logger: Any, records: list[dict[str, Any]]) -> None:
    if logger is None:
        return
    names = ("marking/loss", "marking/loss_shift", "marking/loss_feat_dist", "marking/loss_img_dist")
    for step, values in enumerate(_loss_curve(records)):
        logger.log_metrics({**dict(zip(names, map(float, values), strict=True)), "marking/step": step},
                           step=step)
    if hasattr(logger, "save"):
        logger.save()
