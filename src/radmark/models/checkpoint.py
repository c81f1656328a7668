"""radmark's checkpoint format: a plain state_dict (``torch.save``) plus a ``.json`` sidecar of metadata.

Anyone can read it with ``torch.load(path, weights_only=True)`` and a torchvision constructor; radmark's
training classes are never needed, so a suspect model can be handed over without our code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from radmark.models.architectures import (
    build_model,
    check_arch,
    classifier_name,
    fix_legacy_keys,
    get_classifier,
    infer_num_classes,
    infer_small_input,
)

FORMAT = "radmark-checkpoint-v1"


def meta_path(path: str | os.PathLike) -> Path:
    """The json sidecar of checkpoint ``path``."""
    return Path(path).with_suffix(".json")


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    # Temp file in the same directory so os.replace is atomic: a crash never leaves a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``model``'s state_dict to ``path`` and ``meta`` (completed where inferable) to ``path``.json.

    ``meta`` should hold ``arch``, ``image_size``, ``mean``, ``std``; ``num_classes``, ``small_input`` and
    ``classifier`` are filled in from the model when absent. Returns the checkpoint path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    arch = meta.get("arch")
    if arch is not None:
        check_arch(arch)
    classifier = meta.get("classifier") or (classifier_name(arch) if arch else None)
    full: dict[str, Any] = {
        "format": FORMAT,
        "arch": arch,
        "num_classes": get_classifier(model, classifier).out_features if classifier else None,
        "small_input": infer_small_input(arch, state_dict) if arch else None,
        "image_size": None,
        "mean": None,
        "std": None,
        "classifier": classifier,
    }
    for k in ("num_classes", "small_input"):
        if meta.get(k) is not None and full[k] is not None and meta[k] != full[k]:
            raise ValueError(f"save_checkpoint: meta says {k}={meta[k]} but the model has {k}={full[k]}")
    full.update({k: v for k, v in meta.items() if v is not None or k not in full})
    full["torch_version"] = torch.__version__
    _atomic_write(path, lambda f: torch.save(state_dict, f), "wb")
    text = json.dumps(full, indent=2, sort_keys=True, default=_jsonable) + "\n"
    _atomic_write(meta_path(path), lambda f: f.write(text), "w")
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The json sidecar of ``path`` as a dict, or None if there is none."""
    mp = meta_path(path)
    if mp == Path(path) or not mp.is_file():
        return None
    with open(mp) as f:
        return json.load(f)


def read_state_dict(path: str | os.PathLike, config_key: str | None = None) -> dict[str, Tensor]:
    """A plain state_dict from ``path`` (also unwraps ``{"state_dict": ...}`` and ``module.`` prefixes)."""
    path = Path(path)
    where = f" (config key {config_key})" if config_key else ""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found{where}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled classes (e.g. a full Lightning checkpoint) are refused by weights_only
        raise ValueError(
            f"{path}{where} is not a plain state_dict readable with torch.load(weights_only=True): {e}"
        ) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}{where} does not hold a state_dict (a dict of tensors)")
    for prefix in ("module.", "model."):  # DataParallel / wrapper-module checkpoints
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    small_input: bool | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path``; returns (model in eval mode, completed meta).

    Values not given are taken from the json sidecar, else inferred from tensor shapes (``arch`` must come
    from one of the two). A value given that contradicts the checkpoint raises ValueError.
    """
    path = Path(path)
    meta = dict(read_meta(path) or {})
    state_dict = read_state_dict(path)
    if arch is None:
        arch = meta.get("arch")
        if arch is None:
            raise ValueError(f"checkpoint {path} has no {meta_path(path).name} naming its arch: pass arch=")
    elif meta.get("arch") not in (None, arch):
        raise ValueError(f"checkpoint {path} is a {meta['arch']} but arch={arch!r} was asked for")
    check_arch(arch)
    state_dict = fix_legacy_keys(arch, state_dict)

    try:
        n_ckpt = infer_num_classes(arch, state_dict)
        small_ckpt = infer_small_input(arch, state_dict)
    except KeyError as e:
        raise ValueError(f"checkpoint {path}: {e.args[0]}") from e
    if num_classes is not None and num_classes != n_ckpt:
        raise ValueError(f"checkpoint {path} has {n_ckpt} classes but the caller expects {num_classes}")
    if small_input is not None and small_input != small_ckpt:
        raise ValueError(
            f"checkpoint {path} is the small_input={small_ckpt} variant of {arch} but small_input={small_input} "
            "was asked for"
        )
    for k, v in (("num_classes", n_ckpt), ("small_input", small_ckpt)):
        if meta.get(k) not in (None, v):
            raise ValueError(
                f"checkpoint {path}: {meta_path(path).name} says {k}={meta[k]} but the tensors say {v}"
            )

    model = build_model(arch, n_ckpt, small_input=small_ckpt)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {path} does not fit {arch} (num_classes={n_ckpt}, small_input={small_ckpt}): {e}"
        ) from e
    model.eval()
    meta.update(arch=arch, num_classes=n_ckpt, small_input=small_ckpt)
    meta.setdefault("classifier", classifier_name(arch))
    return model, meta
