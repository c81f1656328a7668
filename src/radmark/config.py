"""Typed schemas for every number that decides a result.

The schema is registered in Hydra's ConfigStore as ``radmark_schema`` and is the first entry of
``conf/config.yaml``'s defaults, so the composed config is in struct mode: an override or an experiment
file that names a key the schema does not have (``marking.fractoin=0.1``) fails at compose time instead of
silently falling back to a default.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class SeedsConfig:
    """One root seed plus named streams. A named seed left at ``None`` is derived from ``root`` and the
    stream's name, so changing ``train`` never changes ``selection`` (which images are marked) or ``key``."""

    root: int = 0
    key: int | None = None  # carriers (and the secret per-image coins)
    selection: int | None = None  # which private images are marked
    splits: int | None = None  # public / private / heldout / test
    marking: int | None = None  # random augmentations drawn while marking
    train: int | None = None  # victim init, data order, augmentation
    detection: int | None = None  # control keys for calibration


@dataclass
class SplitSizes:
    """Images per split; ``-1`` means "all that are left" (public/private/heldout come from the train pool,
    test from the test pool)."""

    public: int = 10000
    private: int = 5000
    heldout: int = 1000
    test: int = 2000


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | imagefolder
    root: str = MISSING
    num_classes: int = 10
    image_size: int = 32  # side of the stored square image every stage sees
    resize: int = 32  # shorter side before the centre crop to image_size (imagefolder)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    splits: SplitSizes = field(default_factory=SplitSizes)
    batch_size: int = 128
    num_workers: int = 0
    download: bool = True


@dataclass
class MarkingNetConfig:
    """The frozen feature extractor phi whose feature space holds the carriers."""

    arch: str = "resnet18"
    small_input: bool = False  # True: 3x3 stem without max-pool (CIFAR-style); False: torchvision stem
    pretrained: str | None = None  # None: train on the public split; "imagenet" or a path: load weights
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: str = "crop_flip"


@dataclass
class MarkingConfig:
    name: str = "paper"
    fraction: float = 0.01  # q: share of the private split that gets marked
    # uniform | per_class | hard (lowest marking-net confidence in the true class first, centre view)
    selection: str = "uniform"
    # selection=hard only: at most this share of the private split is chosen by hardness, the rest of the
    # fraction uniformly (seeds.selection); null: all by hardness
    hard_cap: float | None = None
    network: MarkingNetConfig = field(default_factory=MarkingNetConfig)
    carriers: str = "sphere"  # sphere (paper) | pca:K (inside the top-K principal subspace of public features)
    twins: bool = True  # two keys per class and a secret coin per image (exact black-box sign test)
    # carrier: optimise toward the class carrier (paper) | noise: add a secret per-image +-radius pattern,
    # its twin gets the opposite sign (needs twins; black-box twin test only, the carriers are not used)
    method: str = "carrier"
    lambda_ft: float = 0.01
    lambda_img: float = 0.0005
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 1.0
    steps: int = 90
    radius: float = 10.0  # L-inf budget on the 0-255 scale
    round_every: int = 10
    augmentation: str = "random"  # random (random resized crop + flip) | center
    crop_scale_min: float = 0.5
    batch_size: int = 64
    shard_size: int = 256


@dataclass
class VictimConfig:
    arch: str = "resnet18"  # resnet18 | vgg16 | densenet121
    small_input: bool = False
    mode: str = "scratch"  # scratch | finetune | linear | distill
    init: str | None = None  # finetune/linear: checkpoint path, "imagenet", or "marking_net"
    teacher: str | None = None  # distill: checkpoint of a teacher trained on marked data
    temperature: float = 4.0
    augment: str = "crop_flip"  # none | flip | crop_flip | strong
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step
    step_every: int = 30
    step_gamma: float = 0.1


class BlackboxStatistic(Enum):
    """``detection.blackbox_stat`` (see :mod:`radmark.detection.blackbox`)."""

    sign = "sign"
    signed_rank = "signed_rank"


@dataclass
class DetectionConfig:
    name: str = "paper"
    whitebox: bool = True
    blackbox: bool = True
    n_heldout: int = 1000  # held-out images used for the least-squares alignment
    classifier_module: str | None = None  # dotted name of the suspect's last linear layer; None: by arch
    calibration_keys: int = 200
    # White-box: held-out images marked toward fresh key-independent random carriers, added to the
    # alignment (0: the paper's alignment on clean held-out images only).
    align_probes: int = 0
    # Black-box: loss averaged over this many random crop + flip views (1: the centre view, as the paper).
    blackbox_views: int = 1
    # Black-box statistic over the twin gaps: sign (count of wins) | signed_rank (Wilcoxon: also how far
    # each released copy beats its twin). Both exact under H0; an unknown name fails at compose time.
    blackbox_stat: BlackboxStatistic = BlackboxStatistic.sign


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    enable_progress_bar: bool = True
    deterministic: bool = False
    limit_train_batches: Any = None


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | csv | none
    project: str = "radmark"
    mode: str = "offline"  # wandb: offline (default) | online | disabled
    group: str | None = None


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class RadmarkConfig:
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    marking: MarkingConfig = field(default_factory=MarkingConfig)
    victim: VictimConfig = field(default_factory=VictimConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    stages: list[str] = field(default_factory=lambda: ["mark", "victim", "detect"])
    experiment: str = "default"


def register_configs() -> None:
    ConfigStore.instance().store(name="radmark_schema", node=RadmarkConfig)


def derive_seed(root: int, name: str) -> int:
    """Stable 31-bit seed for the named stream ``name`` under ``root`` (independent of Python's hash)."""
    digest = hashlib.sha256(f"radmark:{root}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def choice_name(value: Any) -> str:
    """An Enum-typed setting (e.g. ``detection.blackbox_stat``) as its plain name; strings pass through."""
    return value.name if isinstance(value, Enum) else str(value)


def resolve_seeds(seeds: SeedsConfig | DictConfig) -> dict[str, int]:
    """Every named seed as an int: explicit values win, the rest derive from ``root``."""
    root = int(seeds.root)
    out = {"root": root}
    for name in ("key", "selection", "splits", "marking", "train", "detection"):
        value = getattr(seeds, name)
        out[name] = int(value) if value is not None else derive_seed(root, name)
    return out


def config_hash(*nodes: Any, length: int = 16) -> str:
    """Hash of resolved config nodes, used to name cached artefacts (marking net, marked data)."""
    payload = [OmegaConf.to_container(n, resolve=True, enum_to_str=True) if isinstance(n, DictConfig) else n for n in nodes]
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


register_configs()
