"""Marked images on disk: lossless PNG shards, per-shard records, the manifest.

Layout of a marked dir::

    key.safetensors
    released/shard_00000/000123.png   the copies that replace the originals in the released data
    twins/shard_00000/000123.png      the unreleased twins (owner only; black-box sign test)
    shards/shard_00000.json           per-image statistics and the loss curve; written last = shard done
    manifest.csv                      all shards, one row per marked image
    DONE.json                         the whole dir is finished

Each shard's PNG folder is written under a temp name and renamed, its record after that: a shard is finished
iff its record exists, so an interrupted run redoes only unfinished shards.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter

from radmark.io import atomic_path

MANIFEST = "manifest.csv"
DONE = "DONE.json"
MANIFEST_FIELDS = (
    "index", "label", "file", "sha256", "psnr", "linf", "shift", "cos",
    "twin_file", "twin_sha256", "twin_psnr", "twin_linf", "twin_shift", "twin_cos",
)  # fmt: skip
STAT_NAMES = ("psnr", "linf", "shift", "cos")


def shard_name(shard: int) -> str:
    return f"shard_{int(shard):05d}"


def record_path(marked_dir: Path, shard: int) -> Path:
    return Path(marked_dir) / "shards" / f"{shard_name(shard)}.json"


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 (3, S, S) -> PNG bytes (RGB, lossless, deterministic for a given Pillow)."""
    arr = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: str | Path) -> torch.Tensor:
    """PNG -> uint8 (3, S, S)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def finished_shards(marked_dir: Path, n_shards: int, twins: bool) -> set[int]:
    """Shards whose record exists (written after their PNG folders were renamed into place) and whose
    folders are still there."""
    groups = ("released", "twins") if twins else ("released",)
    return {
        k for k in range(n_shards)
        if record_path(marked_dir, k).is_file()
        and all((Path(marked_dir) / g / shard_name(k)).is_dir() for g in groups)
    }


def _write_folder(final: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a temp folder beside ``final`` and rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # leftover of an interrupted run (its record was never written): redo it
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_shard(marked_dir: Path, pred: dict[str, Any]) -> dict[str, Any]:
    """Save one shard's PNGs and record (see module docstring); returns the record."""
    marked_dir = Path(marked_dir)
    shard = pred["shard"]
    name = shard_name(shard)
    indices = [int(i) for i in pred["indices"]]
    n = len(indices)
    stats = {k: v.double().tolist() for k, v in pred["stats"].items()}
    rows: list[dict[str, Any]] = [
        {"index": index, "label": int(pred["labels"][j])} for j, index in enumerate(indices)
    ]
    groups = [("released", "", pred["released"])]
    if pred.get("twins") is not None:
        groups.append(("twins", "twin_", pred["twins"]))
    files: dict[str, dict[str, bytes]] = {}
    for g, (group, prefix, images) in enumerate(groups):
        files[group] = {}
        for j, (index, row) in enumerate(zip(indices, rows, strict=True)):
            data = png_bytes(images[j])
            fname = f"{index:06d}.png"
            files[group][fname] = data
            row[f"{prefix}file"] = f"{group}/{name}/{fname}"
            row[f"{prefix}sha256"] = hashlib.sha256(data).hexdigest()
            for stat in STAT_NAMES:
                row[f"{prefix}{stat}"] = stats[stat][g * n + j]  # stats rows: released, then twins
    for group, content in files.items():
        _write_folder(marked_dir / group / name, content)
    record = {"shard": shard, "rows": rows, "loss_terms": pred["loss_terms"].double().tolist(),
              "n_rows": int(pred["rows"])}
    with atomic_path(record_path(marked_dir, shard)) as tmp:
        tmp.write_text(json.dumps(record) + "\n")
    return record


class ShardWriter(BasePredictionWriter):
    """Writes each predicted shard as soon as it is done (so an interruption loses at most one shard)."""

    def __init__(self, marked_dir: Path):
        super().__init__(write_interval="batch")
        self.marked_dir = Path(marked_dir)
        self.written: list[int] = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        write_shard(self.marked_dir, prediction)
        self.written.append(int(prediction["shard"]))


def read_records(marked_dir: Path, n_shards: int) -> list[dict[str, Any]]:
    out = []
    for k in range(n_shards):
        path = record_path(marked_dir, k)
        if not path.is_file():
            raise FileNotFoundError(f"shard record {path} is missing: the marking did not finish")
        out.append(json.loads(path.read_text()))
    return out


def write_manifest(marked_dir: Path, records: list[dict[str, Any]], twins: bool) -> Path:
    """The manifest CSV (atomic), rows sorted by private index; floats written at full precision."""
    path = Path(marked_dir) / MANIFEST
    fields = [f for f in MANIFEST_FIELDS if twins or not f.startswith("twin_")]
    rows = sorted((r for rec in records for r in rec["rows"]), key=lambda r: r["index"])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return path


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Manifest rows with numbers parsed (index/label int, statistics float)."""
    out = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = dict(row)
            parsed["index"], parsed["label"] = int(row["index"]), int(row["label"])
            for k in row:
                if any(k.endswith(s) for s in STAT_NAMES):
                    parsed[k] = float(row[k])
            out.append(parsed)
    return out
