"""The marking optimiser (METHOD.md "Marking") as a LightningModule driven by the predict loop.

Each predict "batch" is one *shard* (up to ``marking.shard_size`` marked images plus their twins); the shard
is optimised in mini-batches of ``marking.batch_size`` rows. Under ``strategy=ddp`` each rank gets whole
shards, and a shard's augmentations come from a generator seeded by (``seeds.marking``, shard id), so the
files are the same whatever the number of processes.

The optimised variable is the *normalised* image (as the paper: SGD lr 1.0 on the normalised image);
bounds (L∞ ball of R/255 around x, and [0, 1]) are mapped into normalised units per channel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from radmark.config import derive_seed
from radmark.marking.augment import AUGMENTATIONS, augment, draw_params
from radmark.marking.key import Key

OPTIMIZERS = ("sgd", "adam")
METHODS = ("carrier", "noise")


@dataclass(frozen=True)
class MarkingSettings:
    """The numbers of ``conf/marking`` that drive the optimisation."""

    lambda_ft: float = 0.01
    lambda_img: float = 0.0005
    optimizer: str = "sgd"
    lr: float = 1.0
    steps: int = 90
    radius: float = 10.0
    round_every: int = 10
    augmentation: str = "random"
    crop_scale_min: float = 0.5
    batch_size: int = 64
    method: str = "carrier"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"marking.method={self.method!r}: choose one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"marking.optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"marking.augmentation={self.augmentation!r}: choose one of {', '.join(AUGMENTATIONS)}"
            )
        if self.steps < 0 or self.radius < 0 or self.batch_size < 1 or self.round_every < 0:
            raise ValueError(f"marking: steps, radius, round_every must be >= 0 and batch_size >= 1 ({self})")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"marking.crop_scale_min={self.crop_scale_min}: must be in (0, 1]")

    @classmethod
    def from_cfg(cls, marking_cfg: Any) -> MarkingSettings:
        return cls(**{k: getattr(marking_cfg, k) for k in cls.__dataclass_fields__})


def shard_seed(marking_seed: int, shard: int) -> int:
    """Seed of shard ``shard``'s augmentation generator."""
    return derive_seed(int(marking_seed), f"marking-shard-{int(shard)}")


class PixelSpace:
    """Conversions between uint8 images and normalised float images, per-channel ``mean``/``std``."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device | str = "cpu"):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> PixelSpace:
        if self.mean.device != device:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def normalize_u8(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def to_u8_float(self, xn: Tensor) -> Tensor:
        """Normalised -> 0-255 scale, rounded, as float (differences to the original stay exact)."""
        return torch.round((xn * self.std + self.mean) * 255.0)


def quantize(xn: Tensor, lo_u8: Tensor, hi_u8: Tensor, space: PixelSpace) -> Tensor:
    """Round normalised images to integer pixels inside [lo_u8, hi_u8] (0-255 floats); returns 0-255 floats.

    Clamping in the integer domain guarantees |q - x| <= floor(R) whatever the float rounding did.
    """
    return torch.minimum(torch.maximum(space.to_u8_float(xn), lo_u8), hi_u8)


def noise_pattern(marking_seed: int, index: int, size: int) -> Tensor:
    """The secret +-1 pattern (1, size, size) of private image ``index`` (shared by the channels: a luminance
    pattern, so grey images stay grey), from a generator seeded by (``seeds.marking``, index)."""
    g = torch.Generator().manual_seed(derive_seed(int(marking_seed), f"noise-{int(index)}"))
    return torch.randint(0, 2, (1, size, size), generator=g).float() * 2 - 1


def noise_marks(x_u8: Tensor, indices: Tensor, coins: Tensor, radius: float, marking_seed: int
                ) -> tuple[Tensor, Tensor]:
    """``marking.method=noise``: (released, twins) uint8 for images ``x_u8`` (n, C, S, S). Image i gets
    round(x +- radius * P_i) clipped to [0, 255], the sign + on the released copy when its coin is 0, - when it
    is 1, and the opposite on its twin. The two copies are as far apart as the L-inf budget allows, and which
    one is released is the secret coin, so the black-box sign test stays exact."""
    patterns = torch.stack([noise_pattern(marking_seed, int(i), x_u8.shape[-1]) for i in indices])
    sign = (1 - 2 * coins.to(torch.float32)).view(-1, 1, 1, 1)
    step = float(round(radius)) * sign * patterns.to(x_u8.device)
    x = x_u8.float()
    released = (x + step).round().clamp(0, 255).to(torch.uint8)
    twins = (x - step).round().clamp(0, 255).to(torch.uint8)
    return released, twins


def mark_batch(
    phi: nn.Module,
    x_u8: Tensor,
    carriers: Tensor,
    params: Tensor | None,
    s: MarkingSettings,
    space: PixelSpace,
    f0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Optimise one batch of images toward their carriers; returns (marked uint8 images, loss terms).

    ``x_u8`` (n, 3, S, S) uint8, ``carriers`` (n, d) unit rows, ``params`` (steps, n, 5) augmentation
    uniforms (None for ``center``), ``f0`` (n, d) = phi(c(x)) if already known. Loss terms: (steps, 4) sums
    over the batch of [total, -shift, feature distance, squared image distance].
    Loss per image: -(phi(T(x~)) - phi(c(x)))·u + lambda_ft ||.||_2 + lambda_img ||x~ - x||_2^2 (normalised).
    """
    device = x_u8.device
    space = space.to(device)
    x0 = space.normalize_u8(x_u8)
    if f0 is None:
        with torch.no_grad():
            f0 = phi(x0)
    r = float(np.floor(s.radius))  # integer pixels can only move by whole levels
    x_f = x_u8.float()
    lo_u8, hi_u8 = (x_f - r).clamp(min=0.0), (x_f + r).clamp(max=255.0)
    # Bounds of the L-inf ball (exact radius R, not floor) intersected with [0, 1], in normalised units.
    rad = s.radius / 255.0 / space.std
    lo = torch.maximum(x0 - rad, (0.0 - space.mean) / space.std)
    hi = torch.minimum(x0 + rad, (1.0 - space.mean) / space.std)

    x = x0.clone().requires_grad_(True)
    if s.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD([x], lr=s.lr)
    else:
        opt = torch.optim.Adam([x], lr=s.lr)
    terms = torch.zeros(s.steps, 4, device=device)
    for step in range(s.steps):
        opt.zero_grad(set_to_none=True)
        view = augment(x, None if params is None else params[step], s.augmentation, s.crop_scale_min)
        delta = phi(view) - f0
        shift = (delta * carriers).sum(1)
        dist = torch.linalg.vector_norm(delta, dim=1)
        img = (x - x0).square().flatten(1).sum(1)
        loss = -shift + s.lambda_ft * dist + s.lambda_img * img
        loss.sum().backward()  # a sum, so each image's gradient is its own loss's: batching changes nothing
        opt.step()
        with torch.no_grad():
            x.copy_(torch.minimum(torch.maximum(x, lo), hi))
            if s.round_every and (step + 1) % s.round_every == 0:
                x.copy_(space.normalize_u8(quantize(x, lo_u8, hi_u8, space)))
            # No .item() here: accumulating on the device avoids a sync per step on GPUs.
            terms[step] = torch.stack([loss.sum(), -shift.sum(), dist.sum(), img.sum()])
    with torch.no_grad():
        out = quantize(x.detach(), lo_u8, hi_u8, space).to(torch.uint8)
    return out, terms


# ---------------------------------------------------------------- shards


def shard_ranges(n_marked: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) positions in the sorted list of marked images, one per shard."""
    if shard_size < 1:
        raise ValueError(f"marking.shard_size={shard_size}: must be >= 1")
    return [(a, min(a + shard_size, n_marked)) for a in range(0, n_marked, shard_size)]


class ShardDataset(Dataset):
    """Item i = shard ``shards[i]``: its original images, labels, private indices and per-row carriers
    (released rows first, then twin rows when the key has twins)."""

    def __init__(self, private: Dataset, key: Key, shards: list[int], shard_size: int):
        self.private = private
        self.key = key
        self.shards = list(shards)
        self.ranges = shard_ranges(key.n_marked, shard_size)
        self.released_u = key.image_carriers(twin=False)
        self.twin_u = key.image_carriers(twin=True) if key.twins else None

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard = self.shards[i]
        a, b = self.ranges[shard]
        indices = self.key.marked_indices[a:b]
        items = [self.private[int(j)] for j in indices]
        images = torch.stack([it[0] for it in items])
        labels = torch.tensor([int(it[1]) for it in items], dtype=torch.int64)
        if not torch.equal(labels, self.key.marked_labels[a:b]):
            raise ValueError("the key's labels do not match the private split: wrong data or split seed")
        carriers = self.released_u[a:b]
        if self.twin_u is not None:
            carriers = torch.cat([carriers, self.twin_u[a:b]])
        return {"shard": shard, "images": images, "labels": labels, "indices": indices, "carriers": carriers,
                "coins": self.key.coins[a:b]}


def first_item(batch: list[Any]) -> Any:
    """collate_fn of the shard loader (batch_size 1: the shard is the batch)."""
    return batch[0]


class MarkingModule(pl.LightningModule):
    """Marks one shard per ``predict_step``; the returned dict goes to :class:`ShardWriter`."""

    def __init__(
        self, phi: nn.Module, settings: MarkingSettings, mean: list[float], std: list[float], marking_seed: int
    ):
        super().__init__()
        self.phi = phi.eval()
        for p in self.phi.parameters():
            p.requires_grad_(False)
        self.settings = settings
        self.space = PixelSpace(mean, std)
        self.marking_seed = int(marking_seed)
        self.save_hyperparameters({"marking": asdict(settings), "marking_seed": self.marking_seed})

    def train(self, mode: bool = True) -> MarkingModule:
        super().train(mode)
        self.phi.eval()  # frozen: BatchNorm must use its running statistics, always
        return self

    def features(self, x_norm: Tensor) -> Tensor:
        return self.phi(x_norm)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        s = self.settings
        images, carriers = batch["images"], batch["carriers"]
        n = images.shape[0]
        rows = carriers.shape[0]  # n or 2n (twins)
        x_u8 = images.repeat(rows // n, 1, 1, 1)
        space = self.space.to(images.device)
        with torch.no_grad():
            f0 = torch.cat([self.phi(space.normalize_u8(c)) for c in images.split(s.batch_size)])
            f0 = f0.repeat(rows // n, 1)
        if s.method == "noise":
            released, twins = noise_marks(images, batch["indices"], batch["coins"], s.radius, self.marking_seed)
            marked = torch.cat([released, twins])
            return self.shard_output(batch, x_u8, marked, carriers, torch.zeros(0, 4, device=images.device), f0)
        generator = torch.Generator().manual_seed(shard_seed(self.marking_seed, int(batch["shard"])))
        params = draw_params(generator, s.steps, rows) if s.augmentation == "random" else None
        outs, terms = [], torch.zeros(s.steps, 4, device=images.device)
        with torch.enable_grad():  # the predict loop runs under no_grad / inference mode
            for a in range(0, rows, s.batch_size):
                b = min(a + s.batch_size, rows)
                p = None if params is None else params[:, a:b]
                out, t = mark_batch(self.phi, x_u8[a:b], carriers[a:b], p, s, space, f0=f0[a:b])
                outs.append(out)
                terms += t
        return self.shard_output(batch, x_u8, torch.cat(outs), carriers, terms, f0)

    def shard_output(self, batch: dict[str, Any], x_u8: Tensor, marked: Tensor, carriers: Tensor, terms: Tensor,
                     f0: Tensor) -> dict[str, Any]:
        """What :class:`ShardWriter` saves for one shard: the marked rows (released, then twins) and their stats."""
        n, rows = batch["images"].shape[0], marked.shape[0]
        stats = self.stats(x_u8, marked, carriers, f0)
        return {
            "shard": int(batch["shard"]),
            "indices": batch["indices"].cpu(),
            "labels": batch["labels"].cpu(),
            "released": marked[:n].cpu(),
            "twins": marked[n:].cpu() if rows > n else None,
            "stats": {k: v.cpu() for k, v in stats.items()},
            "loss_terms": terms.cpu(),
            "rows": rows,
        }

    @torch.no_grad()
    def stats(self, x_u8: Tensor, marked: Tensor, carriers: Tensor, f0: Tensor) -> dict[str, Tensor]:
        """Per row, on what is saved: PSNR and L∞ (0-255), and the centre-view feature shift along the
        carrier and cos(Δφ, u)."""
        diff = marked.double() - x_u8.double()
        mse = diff.square().flatten(1).mean(1)
        psnr = torch.where(mse > 0, 10.0 * torch.log10(255.0**2 / mse.clamp(min=1e-12)), PSNR_IDENTICAL)
        linf = diff.abs().flatten(1).amax(1)
        space = self.space.to(marked.device)
        f1 = torch.cat([self.phi(space.normalize_u8(c)) for c in marked.split(self.settings.batch_size)])
        delta = (f1 - f0).double()
        u = carriers.double()
        shift = (delta * u).sum(1)
        cos = shift / (delta.norm(dim=1) * u.norm(dim=1)).clamp(min=1e-12)
        return {"psnr": psnr, "linf": linf, "shift": shift, "cos": cos}


PSNR_IDENTICAL = 100.0  # reported for an image identical to its original (infinite PSNR)
