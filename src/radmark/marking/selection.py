"""Which private images get marked: drawn from ``seeds.selection`` only (never the training seed).

Nested by construction: one order per selection seed, and a fraction takes a prefix of it (per class for
``per_class``), so for one seed the images marked at q = 1 % are among those marked at q = 5 %. ``hard``
orders by a per-image score (the marking net's confidence in the true class, lowest first) with ties in the
seeded permutation's order, so it is nested too. ``marking.hard_cap`` limits how many are chosen by hardness:
the hardest round(cap·n) first, then the other images in the permutation's order (still nested).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SELECTION_MODES = ("uniform", "per_class", "hard")


def n_of(fraction: float, n: int) -> int:
    """round(fraction * n), halves rounded up (Python's round() would round 0.5 to even)."""
    return int(math.floor(float(fraction) * n + 0.5))


def check_selection(mode: str, fraction: float, hard_cap: float | None = None) -> None:
    """Fail early (before any network is trained) on a selection the owner cannot mean."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"marking.fraction={fraction}: must be in [0, 1]")
    if mode not in SELECTION_MODES:
        raise ValueError(f"marking.selection={mode!r}: choose one of {', '.join(SELECTION_MODES)}")
    if hard_cap is not None:
        if mode != "hard":
            raise ValueError(f"marking.hard_cap={hard_cap} only applies to marking.selection=hard "
                             f"(got {mode!r}); drop marking.hard_cap or set marking.selection=hard")
        if not 0.0 <= float(hard_cap) <= 1.0:
            raise ValueError(f"marking.hard_cap={hard_cap}: must be in [0, 1] (a share of the private split) "
                             "or null (every marked image chosen by hardness)")


def select_marked(
    labels: np.ndarray, fraction: float, mode: str, seed: int, scores: np.ndarray | None = None,
    hard_cap: float | None = None,
) -> np.ndarray:
    """Sorted positions (in the private split) of the images to mark.

    ``uniform``: the first round(q·n) of a random permutation; ``per_class``: the first round(q·n_c) of each
    class, in the order of the same permutation (every class marked at the same rate); ``hard``: the
    round(q·n) images with the lowest ``scores`` (required; e.g. the marking net's softmax probability of the
    true class), ties broken by the same permutation. With ``hard_cap``, ``hard`` takes at most round(cap·n)
    images by score and fills the rest of the fraction from the permutation (hard images of a victim's data
    cost accuracy once many are marked; uniformly chosen ones do not).
    """
    check_selection(mode, fraction, hard_cap)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    if mode == "uniform":
        chosen = perm[: n_of(fraction, n)]
    elif mode == "hard":
        if scores is None or len(scores) != n:
            raise ValueError(f"marking.selection=hard needs one score per private image ({n})")
        order = perm[np.argsort(np.asarray(scores, dtype=np.float64)[perm], kind="stable")]
        if hard_cap is not None:
            hardest = order[: n_of(hard_cap, n)]
            order = np.concatenate([hardest, perm[~np.isin(perm, hardest)]])
        chosen = order[: n_of(fraction, n)]
    else:
        parts = []
        perm_labels = labels[perm]
        for c in np.unique(labels):
            in_class = perm[perm_labels == c]  # this class, in permutation order
            parts.append(in_class[: n_of(fraction, len(in_class))])
        chosen = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.sort(chosen).astype(np.int64)
