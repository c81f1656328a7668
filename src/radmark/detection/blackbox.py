"""Black-box test: an exact test over twins (sign or signed-rank), from the suspect's losses only.

Design (METHOD.md, last section). Every marked private image i of class k has two marked copies, one with
carrier a_k and one with carrier b_k; a secret fair coin c_i decides which copy is released (the other, the
twin, stays with the owner). Statistic: over the marked images, wins = #{i : L(twin_i) > L(released_i)},
L the suspect's cross-entropy loss on the eval view (no augmentation, the suspect's own normalisation);
exact ties are dropped and n counts the remaining pairs. p = P(Bin(n, 1/2) >= wins), reported as log10.

Why it is exact under H0 ("the suspect never trained on the released images"): given the images, the
suspect's losses on the two copies of image i are fixed numbers that cannot depend on c_i, because the
coins are secret, drawn independently for each image and independently of everything the suspect could
have seen. Which of the two copies is called "released" is therefore a fair coin per image, independently
across images, so each non-tied sign is an independent fair coin and wins ~ Bin(n, 1/2). Shared per-class
carriers do not create dependence: the randomness the test uses is the coin, not the carrier. H0 includes
models trained on the *unmarked* originals of the same images. Assumptions: the coins are kept secret
(and the twins never released) and were drawn independently of the suspect; the suspect is evaluated
deterministically (eval mode). A model trained on the released copies tends to have lower loss on them
than on their twins, so wins is large under H1.

Signed-rank variant (``detection.blackbox_stat = signed_rank``): Wilcoxon's signed-rank test on the same
differences d_i = L(twin_i) - L(released_i), W = sum over d_i > 0 of the midrank of |d_i|. Exact for the same
reason: given the images, |d_i| is fixed and the coin only sets the sign of d_i, so the signs are independent fair
coins given the magnitudes and W has the known distribution of :class:`radmark.detection.stats.SignedRankNull`.
It uses how far each released copy beats its twin, not only whether it does (about 1.5x the sign test's
efficiency for smooth symmetric gaps). Zero differences are dropped as in the sign test.

Views (``detection.blackbox_views = V``): with V > 1, L is the loss averaged over V random training-style
views (reflect-padded random crop + flip, as the victim's ``crop_flip``), drawn once from a generator seeded
by ``seeds.detection`` and applied identically to the released copy and its twin. The views are independent
of the coins, so each pair's two losses are still fixed numbers given the images and the views, and the sign
test stays exact. V = 1 is the single centre view above.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import scipy.stats as ss
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_png, read_file

from radmark.config import derive_seed
from radmark.detection import stats
from radmark.detection.whitebox import NetView, detection_trainer

MANIFEST = "manifest.csv"
STATISTICS = ("sign", "signed_rank")


class TwinPairs(Dataset):
    """Items ``(released uint8 (3,S,S), twin uint8 (3,S,S), label, index)`` read from a marked dir's manifest.

    File names in the manifest are relative to ``marked_dir`` (absolute names are used as is).
    """

    def __init__(self, marked_dir: str | Path):
        self.marked_dir = Path(marked_dir)
        manifest = self.marked_dir / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} not found: the black-box test needs the marked-data folder (released/, twins/, "
                f"{MANIFEST}) written by marking; pass it with --marked-dir"
            )
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"label", "file", "twin_file"} <= set(rows[0]):
            raise ValueError(f"{manifest} lacks the columns label, file, twin_file: not a radmark manifest")
        self.rows = [r for r in rows if r.get("twin_file")]
        self.has_twins = bool(rows) and len(self.rows) == len(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, name: str) -> Tensor:
        path = Path(name) if Path(name).is_absolute() else self.marked_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in {self.marked_dir / MANIFEST}) is missing")
        return decode_png(read_file(str(path)), mode=ImageReadMode.RGB)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int, int]:
        r = self.rows[i]
        return self._read(r["file"]), self._read(r["twin_file"]), int(r["label"]), int(r.get("index", i))


def cross_entropy_tail_exact(logits: Tensor, y: Tensor) -> Tensor:
    """Per-item cross-entropy, float64, as softplus(logsumexp_{j != y}(l_j - l_y)).

    Equal to ``F.cross_entropy`` but keeps losses like 1e-30 instead of rounding them to 0: a confident
    model would otherwise score both copies 0 and turn informative pairs into ties.
    """
    z = logits.double() - logits.double().gather(1, y[:, None])
    z = z.scatter(1, y[:, None], float("-inf"))
    return F.softplus(torch.logsumexp(z, dim=1))


def draw_views(n_views: int, seed: int) -> Tensor | None:
    """U(0, 1) parameters (V, 3) of V random crop + flip views (x offset, y offset, flip) from a generator
    seeded by ``derive_seed(seed, "blackbox-views")``; None for V = 1 (the centre view)."""
    if n_views < 1:
        raise ValueError(f"detection.blackbox_views={n_views}: must be >= 1")
    if n_views == 1:
        return None
    g = torch.Generator().manual_seed(derive_seed(int(seed), "blackbox-views"))
    return torch.rand(n_views, 3, generator=g, dtype=torch.float64)


def apply_view(x: Tensor, u: Tensor) -> Tensor:
    """One view of stored images ``x`` (N, 3, S, S): reflect-pad by S // 8, crop S x S at the offsets ``u[0:2]``
    pick (each uniform over the 2 * pad + 1 positions), flip when ``u[2] < 0.5``. Float, 0-255 scale."""
    s = x.shape[-1]
    pad = s // 8
    x = x.float()
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = (min(int(float(v) * (2 * pad + 1)), 2 * pad) for v in u[:2])
    x = x[..., dy : dy + s, dx : dx + s]
    return x.flip(-1) if float(u[2]) < 0.5 else x


class TwinLosses(pl.LightningModule):
    """Predict loop returning the suspect's per-image loss on each released copy and on its twin
    (averaged over ``views`` from :func:`draw_views` when given)."""

    def __init__(self, suspect: NetView, views: Tensor | None = None):
        super().__init__()
        self.suspect = suspect
        self.suspect_net = suspect.model  # submodule: moved to the device, put in eval mode by the Trainer
        self.views = views

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        if self.views is None:
            return cross_entropy_tail_exact(self.suspect_net(self.suspect.inputs(x)), y)
        losses = [cross_entropy_tail_exact(self.suspect_net(self.suspect.inputs(apply_view(x, u))), y)
                  for u in self.views]
        return torch.stack(losses).mean(0)

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[Tensor, Tensor]:
        released, twin, y = batch[0], batch[1], batch[2]
        return self.loss(released, y).double().cpu(), self.loss(twin, y).double().cpu()


def twin_losses(
    suspect: NetView,
    pairs: Dataset,
    trainer: pl.Trainer | None = None,
    batch_size: int = 256,
    views: int = 1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(loss on released copies, loss on twins), each of shape (n_marked,); ``views`` > 1 averages over
    that many random views drawn from ``seed`` (``seeds.detection``), see the module docstring."""
    if len(pairs) == 0:  # type: ignore[arg-type]  # nothing marked (the clean baseline): no signs to count
        return np.zeros(0), np.zeros(0)
    trainer = trainer or detection_trainer()
    module = TwinLosses(suspect, draw_views(int(views), seed))
    out = trainer.predict(module, dataloaders=DataLoader(pairs, batch_size=batch_size))
    assert out is not None
    rel = torch.cat([o[0] for o in out]).numpy()  # type: ignore[index]
    twin = torch.cat([o[1] for o in out]).numpy()  # type: ignore[index]
    return rel, twin


def _differences(loss_released: np.ndarray, loss_twin: np.ndarray) -> np.ndarray:
    """d_i = L(twin_i) - L(released_i): positive when the suspect fits the released copy better."""
    return np.asarray(loss_twin, dtype=np.float64) - np.asarray(loss_released, dtype=np.float64)


def sign_test(loss_released: np.ndarray, loss_twin: np.ndarray) -> dict:
    """Exact one-sided sign test: wins = #(loss_twin > loss_released), ties dropped."""
    diff = _differences(loss_released, loss_twin)
    wins, n = int(np.count_nonzero(diff > 0)), int(np.count_nonzero(diff != 0))
    return {
        "statistic": "sign",
        "log10_p": stats.sign_test_log10_p(wins, n),
        "wins": wins,
        "n": n,
        "ties": int(diff.size - n),
        "loss_gap_mean": float(diff.mean()) if diff.size else None,
    }


def signed_rank_test(loss_released: np.ndarray, loss_twin: np.ndarray) -> dict:
    """Exact one-sided Wilcoxon signed-rank test on the twin gaps (module docstring); zero gaps dropped.

    Also reports the sign test's counts (``wins``, ``n``, ``ties``) and its p-value as ``sign_log10_p``.
    """
    diff = _differences(loss_released, loss_twin)
    null = stats.SignedRankNull(diff)
    res = sign_test(loss_released, loss_twin)
    return {
        **res,
        "statistic": "signed_rank",
        "log10_p": null.log10_p(diff) if null.n else 0.0,
        "sign_log10_p": res["log10_p"],
        "signed_rank_W": null.statistic2(diff) / 2.0,
        "signed_rank_exact": null.exact,
    }


def twin_test(loss_released: np.ndarray, loss_twin: np.ndarray, statistic: str = "sign") -> dict:
    """The black-box test named by ``detection.blackbox_stat``: ``sign`` or ``signed_rank``."""
    if statistic == "sign":
        return sign_test(loss_released, loss_twin)
    if statistic == "signed_rank":
        return signed_rank_test(loss_released, loss_twin)
    raise ValueError(f"detection.blackbox_stat={statistic!r}: choose one of {', '.join(STATISTICS)}")


def coin_null_pvalues(
    loss_released: np.ndarray, loss_twin: np.ndarray, draws: int, generator: torch.Generator,
    statistic: str = "sign",
) -> dict:
    """Twin-test p-values for ``draws`` fresh secret coin draws over the same twins (calibration).

    Under H0 the coin is the only randomness, so re-drawing it (swapping released/twin per image with
    probability 1/2, i.e. flipping the sign of its gap) samples the exact null. Returns ``p`` (the test's
    conservative p-values, for FPR) and ``p_randomized`` (P(T > t) + U * P(T = t), exactly U(0,1) under H0:
    both statistics are discrete, so a KS test against U(0,1) is only meaningful on the randomised version).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"detection.blackbox_stat={statistic!r}: choose one of {', '.join(STATISTICS)}")
    diff = _differences(loss_released, loss_twin)
    # Coins for every pair, ties included, so the stream's use does not depend on the losses.
    flips = torch.randint(0, 2, (draws, diff.size), generator=generator).numpy().astype(bool)
    u = torch.rand(draws, generator=generator, dtype=torch.float64).numpy()
    signed = np.where(flips, -diff, diff)
    n = int(np.count_nonzero(diff != 0))
    if statistic == "sign":
        wins = np.count_nonzero(signed > 0, axis=1)
        p = np.array([10.0 ** stats.sign_test_log10_p(int(w), n) for w in wins])
        pmf = ss.binom.pmf(wins, n, 0.5)
    else:
        null = stats.SignedRankNull(diff)
        # Flipping a coin keeps |d_i| and hence its rank: W2 per draw is the rank sum over the positive signs.
        w2 = ((signed[:, diff != 0] > 0) * null.ranks2).sum(axis=1)
        p = np.array([math.exp(null.ln_sf(w)) for w in w2])
        pmf = np.array([null.pmf(w) for w in w2])
    p_rand = p - pmf + u * pmf
    return {"p": p, "p_randomized": np.clip(p_rand, 0.0, 1.0), "n": n}
