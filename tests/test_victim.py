"""Victim training: every mode x architecture on tiny fake data, frozen parts stay frozen, checkpoints
reload without radmark, metrics and seeds behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import radmark.data.readers as readers
from fakedata import write_fashion_mnist_idx
from radmark.classifier import ClassifierModule
from radmark.config import RadmarkConfig, resolve_seeds
from radmark.data import RadmarkDataModule
from radmark.io import read_json, sha256_file
from radmark.models import build_model, classifier_name, load_checkpoint, save_checkpoint
from radmark.victim import DistillModule, LinearProbeModule, build_victim, replace_classifier, train_victim
from radmark.victim.train import make_victim_trainer

ARCHS = ("resnet18", "vgg16", "densenet121")
MODES = ("scratch", "finetune", "linear", "distill")
# torchvision stems downsample 32 px inputs early (fast); VGG has no stem, and its small variant swaps the
# 120M-parameter head for a 512-wide one, which is what keeps it cheap here.
SMALL = {"resnet18": False, "vgg16": True, "densenet121": False}
AUGMENT = {"scratch": "crop_flip", "finetune": "flip", "linear": "none", "distill": "strong"}
VICTIM_KEYS = (
    "victim/test_acc", "victim/train_acc", "victim/train_seconds", "victim/epochs", "victim/mode",
    "victim/arch", "victim/images_per_s",
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        # Only the test's own files, never the machine's Debian Fashion-MNIST.
        mp.setattr(readers, "FASHION_MNIST_SYSTEM_DIRS", (tmp_path_factory.mktemp("none"),))
        yield write_fashion_mnist_idx(tmp_path_factory.mktemp("fmnist"), n_train=48, n_test=16, seed=0)


def make_cfg(data_root: Path, train_seed: int = 1, **victim):
    cfg = OmegaConf.structured(RadmarkConfig)
    cfg.data.root = str(data_root)
    cfg.data.download = False
    cfg.data.splits.public, cfg.data.splits.private, cfg.data.splits.heldout, cfg.data.splits.test = 8, 32, 8, 16
    cfg.seeds.train = train_seed
    cfg.victim.epochs = 1
    cfg.victim.batch_size = 8
    cfg.trainer.enable_progress_bar = False
    cfg.trainer.limit_train_batches = 2
    for key, value in victim.items():
        cfg.victim[key] = value
    return cfg


def make_dm(cfg) -> RadmarkDataModule:
    seeds = resolve_seeds(cfg.seeds)
    dm = RadmarkDataModule(cfg.data, split_seed=seeds["splits"], batch_size=8, train_seed=seeds["train"])
    dm.setup()
    return dm


def meta_for(arch: str) -> dict:
    return {"arch": arch, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def init_ckpts(tmp_path_factory):
    """Randomly initialised networks standing in for the marking net / a pretrained model / a teacher."""
    root = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    return {
        arch: save_checkpoint(build_model(arch, 10, small_input=SMALL[arch]), root / f"{arch}.pt", meta_for(arch))
        for arch in ARCHS
    }


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def differs(a: dict, b: dict, keys) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_arch_trains(mode, arch, data_root, init_ckpts, tmp_path):
    extra = {"init": str(init_ckpts[arch])} if mode in ("finetune", "linear") else {}
    if mode == "distill":
        extra = {"teacher": str(init_ckpts["resnet18"])}  # architecture transfer: any teacher works
    cfg = make_cfg(data_root, arch=arch, small_input=SMALL[arch], mode=mode, augment=AUGMENT[mode], **extra)
    dm = make_dm(cfg)
    teacher_sha = sha256_file(init_ckpts["resnet18"])

    # The exact starting point train_victim will use (it seeds with seeds.train, then builds).
    pl.seed_everything(resolve_seeds(cfg.seeds)["train"], verbose=False)
    before = state(build_victim(cfg).module.model)

    result = train_victim(cfg, dm, dm.dataset("private"), tmp_path)
    after = state(result.model)
    head = classifier_name(arch)
    head_keys = [k for k in before if k.startswith(head + ".")]
    body_keys = [k for k in before if k not in head_keys]

    assert differs(before, after, head_keys), "the final layer did not train"
    if mode == "linear":
        # Frozen body, BatchNorm running stats and num_batches_tracked included: bit-identical, also to
        # the network it came from.
        source = torch.load(init_ckpts[arch], weights_only=True)
        for key in body_keys:
            assert torch.equal(before[key], after[key]), key
            assert torch.equal(source[key], after[key]), key
    else:
        assert differs(before, after, body_keys), "the body did not train"
    if mode == "distill":
        assert sha256_file(init_ckpts["resnet18"]) == teacher_sha

    assert result.checkpoint.exists() and result.lightning_checkpoint is not None
    model, meta = load_checkpoint(result.checkpoint)
    assert (meta["arch"], meta["num_classes"], meta["small_input"], meta["mode"]) == (arch, 10, SMALL[arch], mode)
    assert meta["image_size"] == 32 and meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())
    assert result.metrics["victim/mode"] == mode and result.metrics["victim/arch"] == arch


@pytest.mark.parametrize("kind", ["linear", "distill"])
@pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode")
def test_frozen_parts_never_change(kind, tmp_path):
    """Module level: even through Lightning's .train() calls, the frozen network keeps its weights and
    BatchNorm statistics; what should train does."""
    torch.manual_seed(0)
    net = build_model("resnet18", 10)
    if kind == "linear":
        replace_classifier(net, "fc", 10)
        module = LinearProbeModule(net, 10, classifier="fc", lr=0.5, epochs=1)
        frozen, trained = module.model, module.model.fc
        frozen_before = {k: v for k, v in state(frozen).items() if not k.startswith("fc.")}
    else:
        frozen = build_model("resnet18", 10).train()  # arrives in train mode: the module must fix that
        module = DistillModule(net, 10, teacher=frozen, temperature=4.0, lr=0.5, epochs=1)
        trained = module.model
        frozen_before = state(frozen)
    trained_before = state(trained)
    module.train()  # what train_victim / Lightning do
    assert not frozen.training and (kind == "linear" or module.model.training)

    data = TensorDataset(torch.randn(16, 3, 32, 32) * 2 + 1, torch.arange(16) % 10)  # shifted: BN stats would move
    cfg = OmegaConf.structured(RadmarkConfig).trainer
    cfg.enable_progress_bar = False
    trainer = make_victim_trainer(cfg, tmp_path, epochs=1, steps_per_epoch=2, logger=False)
    trainer.fit(module, DataLoader(data, batch_size=8))

    frozen_after = state(frozen)
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    assert differs(trained_before, state(trained), trained_before)
    assert not frozen.training
    trainable = {id(p) for p in module.trainable_parameters()}
    assert trainable == {id(p) for p in trained.parameters()}
    if kind == "distill":
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
        assert "teacher" not in module.hparams and "model" not in module.hparams


@pytest.fixture(scope="module")
def scratch_run(data_root, tmp_path_factory):
    cfg = make_cfg(data_root, train_seed=1)
    dm = make_dm(cfg)
    run_dir = tmp_path_factory.mktemp("scratch")
    return cfg, dm, run_dir, train_victim(cfg, dm, dm.dataset("private"), run_dir)


def test_checkpoint_reloads_into_plain_torchvision(scratch_run):
    _, _, _, result = scratch_run
    state_dict = torch.load(result.checkpoint, weights_only=True)
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(state_dict)  # strict: every key, nothing extra
    fresh.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), result.model.eval()(x))
    meta = read_json(result.checkpoint.with_suffix(".json"))
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 10 and meta["small_input"] is False
    assert meta["image_size"] == 32 and meta["mode"] == "scratch"


def test_metrics_json_has_victim_keys(scratch_run):
    _, _, run_dir, result = scratch_run
    metrics = read_json(run_dir / "metrics.json")
    for key in VICTIM_KEYS:
        assert metrics[key] is not None, key
    assert 0.0 <= metrics["victim/test_acc"] <= 1.0 and 0.0 <= metrics["victim/train_acc"] <= 1.0
    assert metrics["victim/epochs"] == 1 and metrics["victim/mode"] == "scratch"
    assert metrics["victim/arch"] == "resnet18" and metrics["victim/images_per_s"] > 0
    assert result.lightning_checkpoint == run_dir / "victim" / "last.ckpt"


def test_train_seed_changes_weights_not_splits(scratch_run, data_root, tmp_path):
    cfg1, dm1, _, first = scratch_run
    splits = {k: v.copy() for k, v in dm1.split_indices.items()}
    fingerprint = dm1.split_fingerprint()

    runs = {}
    for seed in (1, 2):
        cfg = make_cfg(data_root, train_seed=seed)
        dm = make_dm(cfg)
        runs[seed] = train_victim(cfg, dm, dm.dataset("private"), tmp_path / str(seed))
        assert dm.split_fingerprint() == fingerprint
        seeds, seeds1 = resolve_seeds(cfg.seeds), resolve_seeds(cfg1.seeds)
        assert all(seeds[k] == seeds1[k] for k in ("key", "selection", "splits", "marking"))
    assert all((dm1.split_indices[k] == v).all() for k, v in splits.items())

    w = {seed: state(r.model) for seed, r in runs.items()}
    w_first = state(first.model)
    assert all(torch.equal(w_first[k], w[1][k]) for k in w_first)  # same seed: same victim
    assert differs(w_first, w[2], w_first)


def test_resume_from_matching_last_ckpt_only(scratch_run, data_root):
    cfg, dm, run_dir, first = scratch_run
    again = train_victim(cfg, dm, dm.dataset("private"), run_dir)
    assert again.metrics["victim/resumed"] is True
    assert again.metrics["victim/train_seconds"] == first.metrics["victim/train_seconds"]
    a, b = state(first.model), state(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = make_cfg(data_root, train_seed=1, lr=0.05)
    changed = train_victim(other, dm, dm.dataset("private"), run_dir)
    assert changed.metrics["victim/resumed"] is False


def test_clear_errors(data_root, tmp_path, monkeypatch):
    dm = make_dm(make_cfg(data_root))
    private = dm.dataset("private")
    with pytest.raises(ValueError, match="victim.mode"):
        train_victim(make_cfg(data_root, mode="sideways"), dm, private, tmp_path)
    with pytest.raises(ValueError, match="victim.init"):
        train_victim(make_cfg(data_root, mode="finetune"), dm, private, tmp_path)
    with pytest.raises(ValueError, match="marking_net"):
        train_victim(make_cfg(data_root, mode="linear", init="marking_net"), dm, private, tmp_path)
    with pytest.raises(ValueError, match="victim.teacher"):
        train_victim(make_cfg(data_root, mode="distill"), dm, private, tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("RADMARK_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(FileNotFoundError, match="ImageNet weights"):
        train_victim(make_cfg(data_root, mode="finetune", init="imagenet"), dm, private, tmp_path)


def test_marking_net_init_is_the_passed_checkpoint(data_root, init_ckpts):
    cfg = make_cfg(data_root, mode="linear", init="marking_net")
    built = build_victim(cfg, init_checkpoint=init_ckpts["resnet18"])
    assert built.sources["init"] == str(Path(init_ckpts["resnet18"]).resolve())
    assert isinstance(built.module, LinearProbeModule) and isinstance(built.module, ClassifierModule)


def test_paper_recipe_composes():
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["victim=paper_recipe"])
    v = cfg.victim
    assert (v.arch, v.schedule, v.step_every, v.epochs, v.weight_decay) == ("resnet18", "step", 30, 90, 1e-4)
