"""Which private images get marked: drawn from ``seeds.selection`` only (never the training seed).

Nested by construction: one permutation per selection seed, and a fraction takes a prefix of it (per class
for ``per_class``), so for one seed the images marked at q = 1 % are among those marked at q = 5 %.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SELECTION_MODES = ("uniform", "per_class")


def n_of(fraction: float, n: int) -> int:
    """round(fraction * n), halves rounded up (Python's round() would round 0.5 to even)."""
    return int(math.floor(float(fraction) * n + 0.5))


def select_marked(labels: np.ndarray, fraction: float, mode: str, seed: int) -> np.ndarray:
    """Sorted positions (in the private split) of the images to mark.

    ``uniform``: the first round(q·n) of a random permutation; ``per_class``: the first round(q·n_c) of each
    class, in the order of the same permutation (every class marked at the same rate).
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"marking.fraction={fraction}: must be in [0, 1]")
    if mode not in SELECTION_MODES:
        raise ValueError(f"marking.selection={mode!r}: choose one of {', '.join(SELECTION_MODES)}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    if mode == "uniform":
        chosen = perm[: n_of(fraction, n)]
    else:
        parts = []
        perm_labels = labels[perm]
        for c in np.unique(labels):
            in_class = perm[perm_labels == c]  # this class, in permutation order
            parts.append(in_class[: n_of(fraction, len(in_class))])
        chosen = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.sort(chosen).astype(np.int64)
