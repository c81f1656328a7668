"""The secret key: carriers in the marking network's feature space, the per-image coins, which images were
marked, and everything detection needs to rebuild the marking network's features.

One safetensors file (no pickle): tensors plus a single metadata entry holding a JSON blob. A single entry
because safetensors serialises its metadata map in hash order: with one entry the file's bytes are a pure
function of the key, so the sha256 an owner publishes is reproducible.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from radmark.io import atomic_path

log = logging.getLogger(__name__)

KEY_FORMAT = "radmark-key-v1"
META_ENTRY = "radmark_key"
CARRIER_MODES = ("sphere", "pca:K")


@dataclass
class Key:
    """A loaded key. ``carriers`` (C, d) are the white-box directions, one unit vector per class.

    With twins, ``carriers_a`` / ``carriers_b`` are the two carrier sets and ``coins[j]`` says which set
    marked the *released* copy of image ``marked_indices[j]`` (0: A, 1: B); its unreleased twin used the
    other. ``carriers = normalise(A + B)`` is again a uniform random unit vector under H0, so the white-box
    test needs no special case. ``basis`` (K, d) is set for ``pca:K`` carriers (they lie in its row span).
    """

    carriers: Tensor
    carriers_a: Tensor
    carriers_b: Tensor | None
    coins: Tensor
    marked_indices: Tensor
    marked_labels: Tensor
    meta: dict[str, Any]
    basis: Tensor | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def num_classes(self) -> int:
        return int(self.carriers.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.carriers.shape[1])

    @property
    def twins(self) -> bool:
        return self.carriers_b is not None

    @property
    def carrier_dim(self) -> int:
        """Dimension of the space the carriers are uniform in (the white-box null's ``d``)."""
        return int(self.basis.shape[0]) if self.basis is not None else self.feature_dim

    @property
    def n_marked(self) -> int:
        return int(self.marked_indices.numel())

    def image_carriers(self, twin: bool = False) -> Tensor:
        """(m, d): the carrier each marked image's released copy (or, ``twin=True``, its twin) moved along."""
        if twin and self.carriers_b is None:
            raise ValueError("this key has no twins (marking.twins=false)")
        labels = self.marked_labels.long()
        if self.carriers_b is None:
            return self.carriers_a[labels]
        sets = torch.stack([self.carriers_a, self.carriers_b])  # (2, C, d)
        coin = self.coins.long()
        return sets[(1 - coin) if twin else coin, labels]

    def tensors(self) -> dict[str, Tensor]:
        out = {
            "carriers": self.carriers,
            "carriers_a": self.carriers_a,
            "coins": self.coins,
            "marked_indices": self.marked_indices,
            "marked_labels": self.marked_labels,
        }
        if self.carriers_b is not None:
            out["carriers_b"] = self.carriers_b
        if self.basis is not None:
            out["basis"] = self.basis
        # clone: safetensors refuses tensors sharing memory (carriers is carriers_a without twins)
        return {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- drawing carriers


def unit_rows(g: Tensor) -> Tensor:
    """Rows of ``g`` normalised in float64 (so the float32 result is unit to rounding)."""
    return torch.nn.functional.normalize(g.to(torch.float64), dim=1).to(torch.float32)


def parse_carriers(mode: str) -> int | None:
    """``sphere`` -> None; ``pca:K`` -> K. Anything else is a config error."""
    if mode == "sphere":
        return None
    if mode.startswith("pca:"):
        try:
            k = int(mode.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return k
    raise ValueError(f"marking.carriers={mode!r}: choose 'sphere' (the paper) or 'pca:K' with K >= 1")


def draw_carriers(
    generator: torch.Generator, num_classes: int, dim: int, basis: Tensor | None = None
) -> Tensor:
    """C i.i.d. uniform unit vectors in R^dim, or in the row span of ``basis`` (K, dim, orthonormal rows)."""
    k = dim if basis is None else int(basis.shape[0])
    g = torch.randn(num_classes, k, generator=generator, dtype=torch.float64)
    if basis is not None:
        g = g @ basis.to(torch.float64)  # orthonormal rows: a uniform K-sphere maps to a uniform K-sphere
    return unit_rows(g)


def pca_basis(features: Tensor, k: int) -> Tensor:
    """Top-``k`` principal directions (k, d) of ``features`` (n, d), signs fixed (largest entry positive)."""
    f = features.to(torch.float64)
    f = f - f.mean(0, keepdim=True)
    if k > min(f.shape):
        raise ValueError(f"marking.carriers=pca:{k} needs k <= min(n_public, d) = {min(f.shape)}")
    _, _, vh = torch.linalg.svd(f, full_matrices=False)
    basis = vh[:k]
    sign = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    return (basis * sign).to(torch.float32)


def make_key(
    seed: int,
    num_classes: int,
    dim: int,
    marked_indices: Tensor,
    marked_labels: Tensor,
    n_private: int,
    twins: bool,
    meta: dict[str, Any],
    basis: Tensor | None = None,
) -> Key:
    """Draw the key from a generator seeded with ``seed`` (``seeds.key``), in a fixed order:
    carriers A, carriers B (twins), then one coin per *private* image (so an image's coin does not depend on
    the fraction marked), of which the marked images' coins are kept."""
    g = torch.Generator().manual_seed(int(seed))
    a = draw_carriers(g, num_classes, dim, basis)
    b = draw_carriers(g, num_classes, dim, basis) if twins else None
    marked_indices = marked_indices.to(torch.int64)
    if twins:
        all_coins = torch.randint(0, 2, (n_private,), generator=g, dtype=torch.int64)
        coins = all_coins[marked_indices]
        carriers = unit_rows(a.double() + b.double())  # type: ignore[union-attr]
    else:
        coins = torch.zeros_like(marked_indices)
        carriers = a
    return Key(
        carriers=carriers,
        carriers_a=a,
        carriers_b=b,
        coins=coins,
        marked_indices=marked_indices,
        marked_labels=marked_labels.to(torch.int64),
        meta={"format": KEY_FORMAT, **meta},
        basis=basis,
    )


# ---------------------------------------------------------------- file format


def key_bytes(key: Key) -> bytes:
    """The key file's exact bytes."""
    from safetensors.torch import save

    meta = {"format": KEY_FORMAT, **{k: v for k, v in key.meta.items() if k != "format"}}
    blob = json.dumps(meta, sort_keys=True, default=str)
    return save(key.tensors(), metadata={META_ENTRY: blob})


def save_key(key: Key, path: str | Path) -> Path:
    """Write ``key`` atomically to ``path`` (``key.safetensors``); returns the path."""
    path = Path(path)
    data = key_bytes(key)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def load_key(path: str | Path) -> Key:
    """Load a key written by :func:`save_key`; a wrong or damaged file raises ValueError saying why."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"key file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error type, or OSError/ValueError on odd files
        raise ValueError(f"{path} is not a radmark key (not a readable safetensors file: {err})") from err
    if META_ENTRY not in raw_meta:
        raise ValueError(f"{path} is a safetensors file but not a radmark key (no '{META_ENTRY}' metadata)")
    try:
        meta = json.loads(raw_meta[META_ENTRY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the key's metadata is not valid JSON ({err})") from err
    if meta.get("format") != KEY_FORMAT:
        raise ValueError(f"{path}: key format {meta.get('format')!r} is not {KEY_FORMAT!r}")
    missing = [n for n in ("carriers", "carriers_a", "coins", "marked_indices", "marked_labels") if n not in tensors]
    if missing:
        raise ValueError(f"{path}: radmark key is missing tensors {missing}")
    key = Key(
        carriers=tensors["carriers"],
        carriers_a=tensors["carriers_a"],
        carriers_b=tensors.get("carriers_b"),
        coins=tensors["coins"],
        marked_indices=tensors["marked_indices"],
        marked_labels=tensors["marked_labels"],
        meta=meta,
        basis=tensors.get("basis"),
        path=path,
    )
    _check_shapes(key, path)
    return key


def _check_shapes(key: Key, where: Path | str) -> None:
    c, d = key.carriers.shape
    for name, t in (("carriers_a", key.carriers_a), ("carriers_b", key.carriers_b)):
        if t is not None and tuple(t.shape) != (c, d):
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {(c, d)}")
    m = key.marked_indices.shape
    if key.coins.shape != m or key.marked_labels.shape != m:
        raise ValueError(f"{where}: coins / marked_labels / marked_indices lengths differ")
    if key.twins != bool(key.meta.get("twins", key.twins)):
        raise ValueError(f"{where}: metadata says twins={key.meta.get('twins')} but the tensors disagree")


def keys_equal(a: Key, b: Key) -> bool:
    """Same tensors (metadata ignored)."""
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
