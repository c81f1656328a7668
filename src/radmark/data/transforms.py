"""From stored uint8 images to network inputs: scaling, augmentation, normalisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("none", "flip", "crop_flip", "strong")


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or float on the 0-255 scale) -> float32 in [0, 1]; differentiable for float input."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32)
    return x / 255.0


def _stats(values: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor([float(v) for v in values], dtype=like.dtype, device=like.device)
    return t.view(-1, 1, 1)  # broadcasts over (C, H, W) and (N, C, H, W)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for float images in [0, 1], shape (C, H, W) or (N, C, H, W)."""
    return (x - _stats(mean, x)) / _stats(std, x)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize`: back to float images in [0, 1]."""
    return x * _stats(std, x) + _stats(mean, x)


def make_transform(
    augment: str, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Transform for uint8 ``(3, S, S)`` images: to float [0, 1], augment, normalise.

    ``augment``: ``none`` | ``flip`` | ``crop_flip`` (reflect-padded random crop + flip, the standard small-image
    recipe) | ``strong`` (random resized crop with scale (0.35, 1) + flip + mild colour jitter).
    """
    if augment == "none":
        aug: list = []
    elif augment == "flip":
        aug = [v2.RandomHorizontalFlip()]
    elif augment == "crop_flip":
        aug = [
            v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
        ]
    elif augment == "strong":
        aug = [
            v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    else:
        raise ValueError(f"augment={augment!r} is unknown; choose one of {', '.join(AUGMENTATIONS)}")
    mean = [float(m) for m in mean]
    std = [float(s) for s in std]
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), *aug, v2.Normalize(mean, std)])
