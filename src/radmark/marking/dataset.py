"""The private split as released: marked copies in place of the originals."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from radmark.marking.writer import MANIFEST, read_manifest, read_png


class MarkedDataset(Dataset):
    """Items ``(uint8 (3, S, S), label, index)`` exactly like ``base``, with the image of every marked index
    read from its PNG.

    ``marked`` is a marked dir (its ``manifest.csv`` gives index -> file and label) or a mapping
    ``index -> PNG path``. PNGs are decoded lazily, or all at once with ``preload=True``.
    """

    def __init__(self, base: Dataset, marked: str | Path | Mapping[int, str | Path], preload: bool = False):
        self.base = base
        n = len(base)  # type: ignore[arg-type]
        if isinstance(marked, Mapping):
            self.files = {int(i): Path(p) for i, p in marked.items()}
        else:
            marked_dir = Path(marked)
            manifest = marked_dir / MANIFEST
            if not manifest.is_file():
                raise FileNotFoundError(f"{manifest} not found: {marked_dir} is not a finished marked dir")
            rows = read_manifest(manifest)
            self.files = {r["index"]: marked_dir / r["file"] for r in rows}
            labels = self._base_labels()
            if labels is not None:
                wrong = [r["index"] for r in rows if r["index"] >= n or int(labels[r["index"]]) != r["label"]]
                if wrong:
                    raise ValueError(
                        f"{manifest} does not match this private split (labels differ at indices "
                        f"{wrong[:5]}): another dataset or split seed?"
                    )
        bad = [i for i in self.files if not 0 <= i < n]
        if bad:
            raise ValueError(f"marked indices {bad[:5]} are outside the split (size {n})")
        self.cache: dict[int, torch.Tensor] = {}
        if preload:
            self.cache = {i: read_png(p) for i, p in self.files.items()}

    def _base_labels(self) -> np.ndarray | None:
        labels = getattr(self.base, "labels", None)
        return None if labels is None else np.asarray(labels)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the split (marking never changes a label)."""
        labels = self._base_labels()
        if labels is None:
            labels = np.asarray([self.base[i][1] for i in range(len(self))])
        return labels

    @property
    def marked_indices(self) -> np.ndarray:
        return np.asarray(sorted(self.files), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any, Any]:
        image, label, index = self.base[i]
        path = self.files.get(int(index))
        if path is None:
            return image, label, index
        marked = self.cache.get(int(index))
        if marked is None:
            marked = read_png(path)
        if marked.shape != image.shape:
            raise ValueError(f"{path}: shape {tuple(marked.shape)} but the original is {tuple(image.shape)}")
        return marked, label, index
