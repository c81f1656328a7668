"""Pretrained weights: torchvision ImageNet weights from the local torch hub cache, or a local file.

Nothing is downloaded unless ``RADMARK_ALLOW_DOWNLOAD=1``: runs are often on machines without network,
and a silent download would also make a result depend on whatever the hub serves that day.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from radmark.models.architectures import build_model, check_arch, fix_legacy_keys
from radmark.models.checkpoint import read_meta, read_state_dict

log = logging.getLogger(__name__)

DEFAULT_CONFIG_KEY = "marking.network.pretrained / victim.init"
ALLOW_DOWNLOAD_ENV = "RADMARK_ALLOW_DOWNLOAD"


def imagenet_weights_url(arch: str) -> str:
    """URL of torchvision's default ImageNet weights for ``arch``."""
    return torchvision.models.get_model_weights(check_arch(arch)).DEFAULT.url


def imagenet_weights_path(arch: str) -> Path:
    """Where torch hub caches those weights (``torch.hub.get_dir()/checkpoints/<file name>``)."""
    filename = os.path.basename(urlparse(imagenet_weights_url(arch)).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _load_imagenet_state_dict(arch: str) -> dict[str, Tensor]:
    path = imagenet_weights_path(arch)
    url = imagenet_weights_url(arch)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
        log.info("downloading %s to %s", url, path.parent)
        return torch.hub.load_state_dict_from_url(
            url, model_dir=str(path.parent), map_location="cpu", check_hash=True, weights_only=True
        )
    raise FileNotFoundError(
        f"ImageNet weights for {arch} not found at {path} (expected file name {path.name}). "
        f"On a machine with network, fetch {url} and copy it to {path} (the torch hub cache; TORCH_HOME "
        f"moves it), or set {ALLOW_DOWNLOAD_ENV}=1 to let radmark download it, or pass a local file path "
        f"instead of 'imagenet'."
    )


def load_matching(model: nn.Module, state_dict: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy every tensor whose name and shape match into ``model``.

    Returns (skipped, unused): model keys left at their initialisation, and file keys that found no
    place. BatchNorm's ``num_batches_tracked`` is ignored (old torchvision files lack it).
    """
    own = model.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    skipped = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    unused = [k for k in state_dict if k not in matched and not k.endswith("num_batches_tracked")]
    return skipped, unused


def load_pretrained_into(
    model: nn.Module, arch: str, weights: str, config_key: str | None = None
) -> list[str]:
    """Load ``weights`` ("imagenet" or a file) into a freshly built ``model`` of ``arch``.

    Tensors that do not fit (another class count, the 32x32 stem or VGG head) keep the fresh model's
    initialisation; their names are returned and logged.
    """
    check_arch(arch)
    key = config_key or DEFAULT_CONFIG_KEY
    if weights == "imagenet":
        state_dict = _load_imagenet_state_dict(arch)
        source = f"ImageNet weights {imagenet_weights_path(arch)}"
    else:
        meta = read_meta(weights)
        if meta and meta.get("arch") not in (None, arch):
            raise ValueError(f"{weights} ({key}) holds a {meta['arch']} checkpoint, but {arch} was asked for")
        state_dict = read_state_dict(weights, config_key=key)
        source = str(weights)
    skipped, unused = load_matching(model, fix_legacy_keys(arch, state_dict))
    if len(skipped) == len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")]):
        raise ValueError(f"no tensor of {source} fits a {arch}: is it a {arch} state_dict?")
    if skipped:
        shown = ", ".join(skipped[:6]) + (", ..." if len(skipped) > 6 else "")
        log.warning(
            "%s: %d tensors did not fit %s and were re-initialised: %s", source, len(skipped), arch, shown
        )
    if unused:
        log.info("%s: %d tensors unused: %s", source, len(unused), ", ".join(unused[:6]))
    return skipped


def load_pretrained(
    arch: str,
    weights: str,
    num_classes: int = 1000,
    small_input: bool = False,
    config_key: str | None = None,
) -> tuple[nn.Module, list[str]]:
    """Build ``arch`` and load ``weights`` into it; returns (model, skipped keys)."""
    model = build_model(arch, num_classes, small_input=small_input)
    return model, load_pretrained_into(model, arch, weights, config_key)
