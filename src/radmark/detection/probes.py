"""Alignment probes for the white-box test (``detection.align_probes``).

Why: the marking net's features on natural images are nearly collapsed (METHOD.md: 10 principal directions
hold ~99 % of the variance), so the least-squares alignment M = pinv(F_m) F_s fitted on clean held-out images
only learns the few directions those images span and maps every other direction, the carriers' included,
to zero. Probes are held-out images marked, with the owner's own marking optimiser and settings, toward
*fresh* random carriers (one per probe); their (marking-net, suspect) features are appended to the clean
held-out features before the fit, so the alignment also sees how mark-like feature shifts map into the
suspect.

Why the null stays exact: the probes are a function of the held-out images, the marking network, the
(public) marking settings and a generator seeded by ``seeds.detection`` alone; the secret key (carriers,
coins, which images were marked) never enters. So, for a suspect that never saw the marked data, the aligned
rows W~ are still independent of the secret carriers, and the Beta null of each cosine holds as before.
For ``pca:K`` keys the probe carriers are drawn inside the key's basis, which is fixed by the public data and
the marking network (not by the key seed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from radmark.config import derive_seed
from radmark.detection.whitebox import NetView
from radmark.marking.augment import draw_params
from radmark.marking.key import draw_carriers
from radmark.marking.module import MarkingSettings, PixelSpace, mark_batch
from radmark.models import FeatureExtractor


def probe_settings(key: Any) -> MarkingSettings:
    """The marking optimiser's settings recorded in the key (``meta["marking"]``); defaults for missing ones."""
    recorded = (getattr(key, "meta", None) or {}).get("marking") or {}
    return MarkingSettings(**{k: recorded[k] for k in MarkingSettings.__dataclass_fields__ if k in recorded})


def torch_device(accelerator: str) -> torch.device:
    """The torch device of a Lightning accelerator name (``auto`` takes a GPU when there is one)."""
    if str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def make_probes(
    marking: NetView,
    heldout: Dataset,
    n: int,
    seed: int,
    settings: MarkingSettings,
    basis: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> TensorDataset:
    """``n`` held-out images (cycling through ``heldout``) marked toward fresh random unit carriers.

    The generator is seeded by ``derive_seed(seed, "align-probes")`` (``seed`` = ``seeds.detection``) and
    draws, in order, the (n, d) carriers (uniform on the sphere, or in ``basis``'s span) and the marking
    augmentations. Returns ``TensorDataset(uint8 images (n, 3, S, S), labels)``. Deliberately takes no key.
    """
    size = len(heldout)  # type: ignore[arg-type]
    if n < 1 or size < 1:
        raise ValueError(f"align_probes={n} needs n >= 1 and a non-empty held-out split ({size} images)")
    items = [heldout[i % size] for i in range(int(n))]
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([int(it[1]) for it in items], dtype=torch.int64)
    if marking.image_size is not None and x.shape[-1] != marking.image_size:
        raise ValueError(f"probes: stored images are {x.shape[-1]} px but the marking net takes "
                         f"{marking.image_size} px")
    g = torch.Generator().manual_seed(derive_seed(int(seed), "align-probes"))
    carriers = draw_carriers(g, int(n), marking.layer.in_features, basis)
    params = draw_params(g, settings.steps, int(n)) if settings.augmentation == "random" else None

    device = torch.device(device)
    model = marking.model
    home = next(model.parameters()).device
    trainable = [w for w in model.parameters() if w.requires_grad]
    for w in trainable:  # gradients w.r.t. the images only
        w.requires_grad_(False)
    outs = []
    try:
        phi = FeatureExtractor(model, marking.classifier).to(device).eval()
        space = PixelSpace(list(marking.mean), list(marking.std), device)
        with torch.enable_grad():
            for a in range(0, int(n), settings.batch_size):
                b = min(a + settings.batch_size, int(n))
                p = None if params is None else params[:, a:b].to(device)
                out, _ = mark_batch(phi, x[a:b].to(device), carriers[a:b].to(device), p, settings, space)
                outs.append(out.cpu())
    finally:
        model.to(home)
        for w in trainable:
            w.requires_grad_(True)
    return TensorDataset(torch.cat(outs), y)
