"""Differentiable random resized crop + horizontal flip, one draw per image, fully batched.

The random numbers are drawn ahead of time (:func:`draw_params`) from a generator the caller seeds, so a
shard's augmentations are the same whatever the batch size, the device or the number of processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENTATIONS = ("random", "center")
N_PARAMS = 5  # area, log aspect ratio, x offset, y offset, flip: all U(0, 1)


def draw_params(generator: torch.Generator, steps: int, n: int) -> Tensor:
    """U(0, 1) numbers of shape (steps, n, 5): one augmentation per image and per step."""
    return torch.rand(steps, n, N_PARAMS, generator=generator, dtype=torch.float32)


def crop_thetas(u: Tensor, scale_min: float, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Affine matrices (n, 2, 3) for ``F.affine_grid`` from uniforms ``u`` (n, 5).

    As torchvision's RandomResizedCrop: area fraction ~ U(scale_min, 1), log aspect ratio uniform in
    log(ratio), crop placed uniformly inside the image (sides clamped to the image); then a flip w.p. 1/2.
    """
    area = scale_min + (1.0 - scale_min) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # half-widths in affine_grid's [-1, 1] coordinates
    h = torch.sqrt(area / r).clamp(max=1.0)
    tx = (2.0 * u[:, 2] - 1.0) * (1.0 - w)
    ty = (2.0 * u[:, 3] - 1.0) * (1.0 - h)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(u.shape[0], 2, 3, dtype=u.dtype, device=u.device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = ty
    return theta


def random_resized_crop(x: Tensor, u: Tensor, scale_min: float) -> Tensor:
    """Crop + flip each image of ``x`` (n, c, s, s) with its own parameters, resized back to s (bilinear)."""
    theta = crop_thetas(u.to(device=x.device, dtype=x.dtype), scale_min)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x: Tensor, u: Tensor | None, mode: str, scale_min: float) -> Tensor:
    """T(x): ``random`` = random resized crop + flip; ``center`` = the evaluation view (identity: stored
    images already are the centre crop)."""
    if mode == "center" or u is None:
        return x
    if mode != "random":
        raise ValueError(f"marking.augmentation={mode!r}: choose one of {', '.join(AUGMENTATIONS)}")
    return random_resized_crop(x, u, scale_min)
