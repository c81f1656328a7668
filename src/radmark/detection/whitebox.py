"""White-box test: do the suspect's classifier rows point along the secret carriers?

Statistic (METHOD.md, "White-box detection"): features of the marking net F_m (n x d) and of the suspect
F_s (n x d_s) on n held-out, never-marked images (centre/eval view, each network with its own
normalisation); M = argmin ||F_m M - F_s|| (least squares, no bias); the suspect's last linear layer W
(C x d_s) mapped into marking space, W~ = W M^T; s_k = cos(W~_k, u_k). Under H0 the carriers u_k are
uniform on the sphere and independent of (W, F_m, F_s), so each s_k has the exact Beta null and the C
one-sided p-values combine with Fisher (:func:`radmark.detection.stats.whitebox_test`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from radmark.data.transforms import normalize, to_float01
from radmark.detection import stats
from radmark.models.architectures import get_classifier, penultimate_features


@dataclass
class NetView:
    """A network as detection sees it: the model, its classifier layer's dotted name and its input recipe.

    Each network gets its own normalisation (and input size), because a third-party suspect need not share
    the marking net's.
    """

    model: nn.Module
    classifier: str
    mean: Sequence[float]
    std: Sequence[float]
    image_size: int | None = None  # None: use the stored image as is

    def inputs(self, x: Tensor) -> Tensor:
        """Stored uint8 images (N, 3, S, S) -> this network's normalised float input."""
        x = to_float01(x)
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        return normalize(x, self.mean, self.std)

    @property
    def layer(self) -> nn.Linear:
        return get_classifier(self.model, self.classifier)


def heldout_loader(dataset: Dataset, n: int, batch_size: int = 256) -> DataLoader:
    """The first ``n`` items of a split (a uniform sample: splits are stored in permuted order)."""
    n = min(int(n), len(dataset))  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("the held-out split is empty: detection needs unmarked held-out images")
    return DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)


class WhiteboxDetector(pl.LightningModule):
    """Predict loop over held-out images returning (F_m, F_s); :meth:`test` turns them into the p-value."""

    def __init__(self, marking: NetView, suspect: NetView, carriers: Tensor):
        super().__init__()
        self.marking = marking
        self.suspect = suspect
        # Registered as submodules so that the Trainer moves them to its device and sets eval mode.
        self.marking_net = marking.model
        self.suspect_net = suspect.model
        # A plain attribute, not a buffer: the statistics are computed on the CPU after the predict loop.
        self.carriers: Tensor = carriers.detach().float().cpu().clone()
        n_classes = suspect.layer.out_features
        if carriers.shape[0] != n_classes:
            raise ValueError(
                f"the suspect's classifier {suspect.classifier!r} has {n_classes} outputs but the key has "
                f"{carriers.shape[0]} carriers (one per class): the suspect was not trained on this "
                "dataset's classes, or the wrong key / classifier module was given"
            )
        d_marking = marking.layer.in_features
        if carriers.shape[1] != d_marking:
            raise ValueError(
                f"the key's carriers have dimension {carriers.shape[1]} but the marking network's features "
                f"have {d_marking}: the key does not belong to this marking network"
            )

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[Tensor, Tensor]:
        x = batch[0]
        fm = penultimate_features(self.marking_net, self.marking.inputs(x), self.marking.classifier)
        fs = penultimate_features(self.suspect_net, self.suspect.inputs(x), self.suspect.classifier)
        # Flatten: a classifier fed (N, d, 1, 1) by a third-party model still yields (N, d) rows.
        return fm.flatten(1).float().cpu(), fs.flatten(1).float().cpu()

    def aligned_rows(self, feats_marking: Tensor, feats_suspect: Tensor) -> Tensor:
        """W~ = W M^T (C, d), float64: the suspect's classifier rows in marking space (see module doc)."""
        W = self.suspect.layer.weight.detach().cpu().double()
        # Same least squares as stats.whitebox_cosines (pinv: handles n < d and dead feature dims).
        M = torch.linalg.pinv(feats_marking.double()) @ feats_suspect.double()
        return W @ M.T

    def test(self, feats_marking: Tensor, feats_suspect: Tensor, carriers: Tensor | None = None,
             basis: Tensor | None = None, aligned: Tensor | None = None) -> dict:
        """White-box result for ``carriers`` (default: the key's) from features already extracted.

        ``basis`` (K, d, orthonormal rows): the carriers are uniform in its span (``pca:K`` keys); the rows
        and carriers are then compared inside that K-dim space, where the null is exact with d = K (in the
        full space the cosine would be shrunk by the rows' off-span part: valid but weaker).
        ``aligned``: W~ precomputed by :meth:`aligned_rows` (calibration reuses it across many keys).
        """
        carriers = (self.carriers if carriers is None else carriers).detach().cpu()
        W = self.suspect.layer.weight.detach().cpu()
        if basis is None and aligned is None:
            cos = stats.whitebox_cosines(W, feats_marking, feats_suspect, carriers)
            d = int(carriers.shape[1])
        else:
            Wt = self.aligned_rows(feats_marking, feats_suspect) if aligned is None else aligned
            U = carriers.double()
            if basis is not None:
                B = basis.detach().cpu().double()
                Wt, U = Wt @ B.T, U @ B.T
            # align=False: rows are already in the carriers' space, stats only normalises and dots.
            cos = stats.whitebox_cosines(Wt, Wt, Wt, U, align=False)
            d = int(U.shape[1])
        res = stats.whitebox_test(cos, d)
        return {
            "log10_p": float(res["log10_p"]),
            "cos_mean": float(res["cos_mean"]),
            "cosines": cos.numpy().tolist(),
            "per_class_log10_p": np.asarray(res["per_class_log10_p"]).tolist(),
            "n_heldout": int(feats_marking.shape[0]),
            "d": d,
            "d_suspect": int(W.shape[1]),
        }


def extract_features(
    detector: WhiteboxDetector, loader: DataLoader, trainer: pl.Trainer | None = None
) -> tuple[Tensor, Tensor]:
    """Run the predict loop and concatenate the per-batch features (F_m, F_s)."""
    trainer = trainer or detection_trainer()
    out = trainer.predict(detector, dataloaders=loader)
    assert out is not None
    fm = torch.cat([o[0] for o in out])  # type: ignore[index]
    fs = torch.cat([o[1] for o in out])  # type: ignore[index]
    return fm, fs


def whitebox_detect(
    marking: NetView,
    suspect: NetView,
    carriers: Tensor,
    heldout: Dataset,
    n_heldout: int,
    trainer: pl.Trainer | None = None,
    batch_size: int = 256,
    basis: Tensor | None = None,
    probes: Dataset | None = None,
) -> dict:
    """The white-box result dict (log10_p, cos_mean, cosines, per_class_log10_p, n_heldout, n_probes, d,
    d_suspect). ``probes``: key-independent marked images whose features join the alignment
    (:mod:`radmark.detection.probes`)."""
    detector = WhiteboxDetector(marking, suspect, carriers)
    fm, fs = extract_features(detector, heldout_loader(heldout, n_heldout, batch_size), trainer)
    n_clean = int(fm.shape[0])
    fm, fs = with_probes(detector, fm, fs, probes, trainer, batch_size)
    return {**detector.test(fm, fs, basis=basis), "n_heldout": n_clean, "n_probes": int(fm.shape[0]) - n_clean}


def with_probes(
    detector: WhiteboxDetector,
    fm: Tensor,
    fs: Tensor,
    probes: Dataset | None,
    trainer: pl.Trainer | None = None,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """(F_m, F_s) with the probes' features appended (unchanged when ``probes`` is None or empty)."""
    if probes is None or not len(probes):  # type: ignore[arg-type]
        return fm, fs
    pm, ps = extract_features(detector, DataLoader(probes, batch_size=batch_size, shuffle=False), trainer)
    return torch.cat([fm, pm]), torch.cat([fs, ps])


def detection_trainer(accelerator: str = "auto", **overrides: Any) -> pl.Trainer:
    """A one-device, full-precision Trainer for inference loops.

    One device because predict outputs are not gathered across DDP ranks; fp32 because reduced precision
    would add rounding noise (and loss ties) to the statistics.
    """
    kwargs: dict[str, Any] = dict(
        accelerator=accelerator,
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
