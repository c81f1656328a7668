"""The marking network phi: pretrained, or trained on the ``public`` split and cached by its config hash.

Either way it ends up as a radmark checkpoint (plain state_dict + json sidecar) under
``<paths.cache_dir>/marking_net/<hash>/model.pt``; the key points at that file and its sha256, so detection
rebuilds exactly the same features with :func:`load_marking_network`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from radmark.config import config_hash, derive_seed, resolve_seeds
from radmark.io import sha256_file
from radmark.models import (
    FeatureExtractor,
    build_model,
    classifier_name,
    imagenet_weights_path,
    load_checkpoint,
    load_pretrained,
    read_meta,
    read_state_dict,
    save_checkpoint,
)
from radmark.models.architectures import infer_num_classes

log = logging.getLogger(__name__)

MARKING_NET_VERSION = 1  # bump when the way the net is made changes: invalidates cached nets
CHECKPOINT_NAME = "model.pt"


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_rank_zero() -> bool:
    """True outside distributed runs and on global rank 0 (also in a DDP child before its first Trainer)."""
    import torch.distributed as dist
    from pytorch_lightning.utilities import rank_zero_only

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return getattr(rank_zero_only, "rank", 0) == 0


def barrier() -> None:
    """Wait for every rank (no-op outside distributed runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _pretrained_source(arch: str, pretrained: str) -> Path:
    path = imagenet_weights_path(arch) if pretrained == "imagenet" else Path(pretrained)
    if not path.is_file() and pretrained == "imagenet":
        load_pretrained(arch, "imagenet")  # explains where the file goes (or downloads it, when allowed)
    if not path.is_file():
        raise FileNotFoundError(
            f"marking.network.pretrained={pretrained!r}: file {path} not found. Give 'imagenet' (torch hub "
            "cache), the path of a state_dict / radmark checkpoint, or null to train one on the public split."
        )
    return path


def marking_net_dir(cfg: DictConfig, split_seed: int) -> Path:
    """Cache folder of the marking network described by ``cfg`` (data, marking.network, split seed)."""
    net_cfg = cfg.marking.network
    extra: dict[str, Any] = {"version": MARKING_NET_VERSION}
    if net_cfg.pretrained is None and cfg.trainer.limit_train_batches is not None:
        extra["limit_train_batches"] = cfg.trainer.limit_train_batches  # it changes the trained net
    if net_cfg.pretrained is not None:  # the weights' content, not just their name, decides the net
        extra["weights_sha256"] = sha256_file(_pretrained_source(net_cfg.arch, str(net_cfg.pretrained)))
    digest = config_hash(cfg.data, net_cfg, int(split_seed), extra)
    return Path(cfg.paths.cache_dir) / "marking_net" / digest


def get_marking_network(cfg: DictConfig, datamodule: Any, logger: Any = None) -> tuple[nn.Module, Path]:
    """The frozen, eval-mode marking network and its checkpoint path (built, trained or reused)."""
    seeds = resolve_seeds(cfg.seeds)
    net_cfg = cfg.marking.network
    out_dir = marking_net_dir(cfg, seeds["splits"])
    path = out_dir / CHECKPOINT_NAME
    if path.is_file():
        log.info("marking network: reusing %s (same data, split and marking.network config)", path)
    else:
        start = time.perf_counter()
        meta: dict[str, Any] = {
            "arch": net_cfg.arch,
            "image_size": int(cfg.data.image_size),
            "mean": [float(m) for m in cfg.data.mean],
            "std": [float(s) for s in cfg.data.std],
            "classifier": classifier_name(net_cfg.arch),
            "config": OmegaConf.to_container(net_cfg, resolve=True),
            "split_seed": int(seeds["splits"]),
        }
        if net_cfg.pretrained is None:
            model, test_acc = _train(cfg, datamodule, seeds["splits"], out_dir, logger)
            meta.update(source="trained on public split", test_acc=test_acc)
        else:
            model = _load_pretrained(cfg, seeds["splits"])
            meta.update(source=str(net_cfg.pretrained), test_acc=_maybe_evaluate(cfg, datamodule, model))
        meta["seconds"] = round(time.perf_counter() - start, 2)
        if is_rank_zero():
            save_checkpoint(model, path, meta)
            log.info("marking network: saved %s", path)
        barrier()
    model, _ = load_checkpoint(path)
    return freeze(model), path


def _seeded_public_loader(cfg: DictConfig, datamodule: Any, seed: int) -> DataLoader:
    """Loader over the public split with marking.network.augment; shuffled by ``seed`` so the net depends
    on its own cached config only (``datamodule.loader`` would shuffle with the victim's train seed)."""
    from radmark.data.datamodule import TransformedDataset

    net_cfg = cfg.marking.network
    base = datamodule.dataset("public")
    bs = int(net_cfg.batch_size)
    n = len(base)
    return DataLoader(
        TransformedDataset(base, datamodule.transform(net_cfg.augment)),
        batch_size=bs,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=datamodule.num_workers,
        persistent_workers=datamodule.num_workers > 0,
        drop_last=n > bs and n % bs == 1,  # a last batch of one image breaks train-mode BatchNorm
    )


def _train(cfg: DictConfig, datamodule: Any, split_seed: int, out_dir: Path, logger: Any
           ) -> tuple[nn.Module, float | None]:
    from radmark.classifier import ClassifierModule
    from radmark.trainer import make_trainer

    net_cfg = cfg.marking.network
    num_classes = int(cfg.data.num_classes)
    seed = derive_seed(int(split_seed), "marking-net")
    log.info("marking network: training %s on the public split (%d epochs)", net_cfg.arch, net_cfg.epochs)
    # fork_rng: the init and augmentation draws come from this seed, and the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(net_cfg.arch, num_classes, small_input=bool(net_cfg.small_input))
        module = ClassifierModule(
            model, num_classes, lr=float(net_cfg.lr), momentum=float(net_cfg.momentum),
            weight_decay=float(net_cfg.weight_decay), epochs=int(net_cfg.epochs), prefix="marking_net",
        )
        trainer = make_trainer(cfg.trainer, default_root_dir=out_dir, max_epochs=int(net_cfg.epochs), logger=logger)
        trainer.fit(module, train_dataloaders=_seeded_public_loader(cfg, datamodule, seed))
        result = trainer.test(module, dataloaders=datamodule.loader("test", train=False), verbose=False)
    acc = result[0].get("marking_net/test_acc") if result else None
    return module.model.cpu(), (float(acc) if acc is not None else None)


def _load_pretrained(cfg: DictConfig, split_seed: int) -> nn.Module:
    net_cfg = cfg.marking.network
    weights = str(net_cfg.pretrained)
    if weights == "imagenet":
        num_classes = 1000
    else:
        meta = read_meta(weights) or {}
        num_classes = meta.get("num_classes") or infer_num_classes(net_cfg.arch, read_state_dict(weights))
    # Tensors that do not fit (e.g. the 3x3 stem of small_input) are re-initialised: seed them.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(int(split_seed), "marking-net"))
        model, skipped = load_pretrained(
            net_cfg.arch, weights, num_classes=int(num_classes), small_input=bool(net_cfg.small_input),
            config_key="marking.network.pretrained",
        )
    if skipped:
        log.warning("marking network: %d pretrained tensors did not fit and are random: %s", len(skipped),
                    ", ".join(skipped[:4]))
    return model


def _maybe_evaluate(cfg: DictConfig, datamodule: Any, model: nn.Module) -> float | None:
    """Test accuracy when the network's classes are the dataset's (not for ImageNet's 1000)."""
    from radmark.models import get_classifier

    if get_classifier(model, arch=cfg.marking.network.arch).out_features != int(cfg.data.num_classes):
        return None
    correct = total = 0
    model = freeze(model)
    with torch.no_grad():
        for x, y, _ in datamodule.loader("test", train=False):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def load_marking_network(key: Any, check_sha256: bool = True) -> FeatureExtractor:
    """phi as recorded in a key (a :class:`~radmark.marking.key.Key` or its ``meta`` dict): a frozen
    FeatureExtractor on CPU, the checkpoint's sha256 verified against the key."""
    meta = key if isinstance(key, dict) else key.meta
    info = meta["marking_net"]
    path = Path(info["checkpoint"])
    if not path.is_file():
        raise FileNotFoundError(f"marking network checkpoint {path} (named by the key) not found")
    if check_sha256 and sha256_file(path) != info["checkpoint_sha256"]:
        raise ValueError(f"{path} is not the marking network the key was made with (sha256 differs)")
    model, _ = load_checkpoint(path, arch=info["arch"], small_input=info["small_input"])
    phi = FeatureExtractor(freeze(model), info["classifier"])
    return phi
