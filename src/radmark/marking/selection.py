"""Which private images get marked: drawn from ``seeds.selection`` only (never the training seed).

Nested by construction: one order per selection seed, and a fraction takes a prefix of it (per class for
``per_class``), so for one seed the images marked at q = 1 % are among those marked at q = 5 %. ``hard``
orders by a per-image score (the marking net's confidence in the true class, lowest first) with ties in the
seeded permutation's order, so it is nested too.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SELECTION_MODES = ("uniform", "per_class", "hard")


def n_of(fraction: float, n: int) -> int:
    """round(fraction * n), halves rounded up (Python's round() would round 0.5 to even)."""
    return int(math.floor(float(fraction) * n + 0.5))


def select_marked(
    labels: np.ndarray, fraction: float, mode: str, seed: int, scores: np.ndarray | None = None
) -> np.ndarray:
    """Sorted positions (in the private split) of the images to mark.

    ``uniform``: the first round(q·n) of a random permutation; ``per_class``: the first round(q·n_c) of each
    class, in the order of the same permutation (every class marked at the same rate); ``hard``: the
    round(q·n) images with the lowest ``scores`` (required; e.g. the marking net's softmax probability of the
    true class), ties broken by the same permutation.
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
    elif mode == "hard":
        if scores is None or len(scores) != n:
            raise ValueError(f"marking.selection=hard needs one score per private image ({n})")
        order = perm[np.argsort(np.asarray(scores, dtype=np.float64)[perm], kind="stable")]
        chosen = order[: n_of(fraction, n)]
    else:
        parts = []
        perm_labels = labels[perm]
        for c in np.unique(labels):
            in_class = perm[perm_labels == c]  # this class, in permutation order
            parts.append(in_class[: n_of(fraction, len(in_class))])
        chosen = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.sort(chosen).astype(np.int64)
