"""Figures a person looks at: originals next to their marked copies and the amplified difference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from radmark.io import atomic_path


def marked_examples_png(original: Any, marked: Any, indices: np.ndarray, out: str | Path, n: int = 6,
                        amplify: float = 10.0) -> Path | None:
    """A grid with one column per image: original / marked / |difference| x ``amplify`` (around grey).

    ``original`` and ``marked`` are datasets with items ``(uint8 (3, S, S), label, index)``.
    """
    if len(indices) == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [int(i) for i in indices[:n]]
    fig, axes = plt.subplots(3, len(chosen), figsize=(1.8 * len(chosen), 5.6), squeeze=False)
    for col, index in enumerate(chosen):
        x = original[index][0].permute(1, 2, 0).numpy().astype(np.int16)
        y = marked[index][0].permute(1, 2, 0).numpy().astype(np.int16)
        diff = np.clip(128 + amplify * (y - x), 0, 255).astype(np.uint8)
        linf = int(np.abs(y - x).max())
        for row, (img, title) in enumerate(((x, "original"), (y, "marked"), (diff, f"diff x{amplify:g}"))):
            ax = axes[row][col]
            ax.imshow(img.astype(np.uint8), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title)
        axes[0][col].set_title(f"#{index} (L∞ {linf})", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out)
