"""Marking: key, selection, the optimiser's guarantees, files on disk, determinism, resume, DDP."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from fakedata import write_fashion_mnist_idx
from radmark.config import resolve_seeds
from radmark.marking import (
    MarkedDataset,
    MarkingSettings,
    load_key,
    load_marking_network,
    make_key,
    mark,
    mark_batch,
    marked_dir_for,
    save_key,
    select_marked,
)
from radmark.marking.augment import crop_thetas, random_resized_crop
from radmark.marking.key import key_bytes, keys_equal
from radmark.marking.module import PixelSpace, noise_pattern
from radmark.marking.writer import DONE, read_manifest, read_png, record_path
from radmark.metrics import read_metrics
from radmark.pipeline import make_datamodule

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
R = 10.0


def compose_cfg(tmp: Path, data_root: Path, *extra: str, run: str = "run"):
    overrides = [
        f"data.root={data_root}", "data.download=false",
        "data.splits.public=200", "data.splits.private=60", "data.splits.heldout=40", "data.splits.test=40",
        "marking.network.epochs=2", "marking.network.batch_size=32", "marking.network.lr=0.01",
        "marking.steps=10", "marking.fraction=0.5", "marking.shard_size=8", "marking.batch_size=32",
        f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / run}",
        "logger=none", "trainer.enable_progress_bar=false", *extra,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_mark(cfg):
    dm = make_datamodule(cfg, resolve_seeds(cfg.seeds))
    return mark(cfg, dm, Path(cfg.paths.output_dir)), dm


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".png", ".safetensors", ".csv")
    }


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fashion_mnist_idx(tmp_path_factory.mktemp("fmnist"), n_train=300, n_test=40, seed=0)


@pytest.fixture(scope="module")
def marked(tmp_path_factory, data_root):
    """One tiny marking run shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("mark")
    cfg = compose_cfg(tmp, data_root)
    result, dm = run_mark(cfg)
    return cfg, result, dm


# ---------------------------------------------------------------- key and selection


def test_key_round_trip_and_wrong_files(tmp_path):
    idx = torch.tensor([1, 4, 7])
    key = make_key(3, num_classes=10, dim=16, marked_indices=idx, marked_labels=torch.tensor([1, 4, 7]),
                   n_private=9, twins=True, meta={"twins": True, "note": "x"})
    assert torch.allclose(key.carriers.norm(dim=1), torch.ones(10))
    assert torch.allclose(key.carriers, torch.nn.functional.normalize(key.carriers_a + key.carriers_b, dim=1),
                          atol=1e-6)
    path = save_key(key, tmp_path / "key.safetensors")
    loaded = load_key(path)
    assert keys_equal(key, loaded) and loaded.meta["note"] == "x" and loaded.twins
    assert path.read_bytes() == key_bytes(loaded)  # re-serialising gives the same bytes (sha is stable)
    # Released and twin carriers are the two sets, swapped by the coin.
    rel, twin = loaded.image_carriers(), loaded.image_carriers(twin=True)
    for j, (c, k) in enumerate(zip(loaded.coins.tolist(), [1, 4, 7], strict=True)):
        sets = (loaded.carriers_a, loaded.carriers_b)
        assert torch.equal(rel[j], sets[c][k]) and torch.equal(twin[j], sets[1 - c][k])
    # Same seed, same key; the coins of an image do not depend on which others are marked.
    again = make_key(3, 10, 16, torch.tensor([4]), torch.tensor([4]), 9, True, {"twins": True})
    assert torch.equal(again.carriers, key.carriers) and again.coins[0] == key.coins[1]

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a key at all" * 20)
    with pytest.raises(ValueError, match="not a radmark key"):
        load_key(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a radmark key"):
        load_key(other)
    with pytest.raises(FileNotFoundError):
        load_key(tmp_path / "missing.safetensors")


def test_selection_nested_per_class_and_seeded():
    labels = np.arange(200) % 10
    small = select_marked(labels, 0.05, "uniform", seed=1)
    large = select_marked(labels, 0.2, "uniform", seed=1)
    assert len(small) == 10 and len(large) == 40 and set(small) <= set(large)
    assert not np.array_equal(large, select_marked(labels, 0.2, "uniform", seed=2))
    pc = select_marked(labels, 0.1, "per_class", seed=1)
    assert np.bincount(labels[pc], minlength=10).tolist() == [2] * 10
    assert set(pc) <= set(select_marked(labels, 0.3, "per_class", seed=1))
    assert len(select_marked(labels, 0.0, "uniform", seed=1)) == 0
    with pytest.raises(ValueError, match="marking.selection"):
        select_marked(labels, 0.1, "random", seed=1)


def test_training_seed_does_not_change_selection(tmp_path, data_root):
    a = compose_cfg(tmp_path, data_root)
    b = compose_cfg(tmp_path, data_root, "seeds.train=12345")
    sa, sb = resolve_seeds(a.seeds), resolve_seeds(b.seeds)
    assert sa["train"] != sb["train"] and sa["selection"] == sb["selection"] and sa["key"] == sb["key"]
    labels = np.arange(60) % 10
    assert np.array_equal(select_marked(labels, 0.5, "uniform", sa["selection"]),
                          select_marked(labels, 0.5, "uniform", sb["selection"]))
    assert marked_dir_for(a, sa, "net") == marked_dir_for(b, sb, "net")  # same cached marked data
    c = compose_cfg(tmp_path, data_root, "seeds.selection=99")
    assert marked_dir_for(c, resolve_seeds(c.seeds), "net") != marked_dir_for(a, sa, "net")


def test_training_seed_reuses_the_marked_data(marked):
    cfg, result, _ = marked
    tmp = Path(cfg.paths.cache_dir).parent
    other, _ = run_mark(compose_cfg(tmp, Path(cfg.data.root), "seeds.train=777", run="run_train777"))
    assert other.reused and other.marked_dir == result.marked_dir
    assert other.key_sha256 == result.key_sha256
    assert np.array_equal(other.marked_indices, result.marked_indices)


# ---------------------------------------------------------------- the optimiser


def test_augmentation_identity_flip_and_gradient():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    full = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.9], [1.0, 0.5, 0.5, 0.5, 0.1]])  # area 1, ratio 1, centre
    theta = crop_thetas(full, scale_min=0.5)
    assert torch.allclose(theta[0], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    y = random_resized_crop(x, full, scale_min=0.5)
    assert torch.allclose(y[0], x[0], atol=1e-5)
    assert torch.allclose(y[1], x[1].flip(-1), atol=1e-5)
    crop = random_resized_crop(x, torch.rand(2, 5), scale_min=0.3)
    crop.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_mark_batch_stays_in_the_ball_on_integer_pixels():
    torch.manual_seed(0)
    phi = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x[0] = 0  # at the range's edge the ball is cut at 0
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    space = PixelSpace([0.3, 0.4, 0.5], [0.2, 0.25, 0.3])
    for settings in (MarkingSettings(steps=7, round_every=3, radius=4.5, lr=1.0),
                     MarkingSettings(steps=5, optimizer="adam", lr=0.05, augmentation="center")):
        params = torch.rand(settings.steps, 4, 5) if settings.augmentation == "random" else None
        out, terms = mark_batch(phi, x, u, params, settings, space)
        assert out.dtype == torch.uint8 and terms.shape == (settings.steps, 4)
        diff = (out.int() - x.int()).abs()
        assert diff.max() <= int(settings.radius) and diff.max() > 0
    with pytest.raises(ValueError, match="marking.optimizer"):
        MarkingSettings(optimizer="lbfgs")


# ---------------------------------------------------------------- a marking run


def test_saved_images_within_radius_valid_png_and_psnr(marked):
    cfg, result, dm = marked
    private = dm.dataset("private")
    rows = read_manifest(result.manifest_path)
    assert len(rows) == 30 == result.metrics["marking/n_marked"]
    assert [r["index"] for r in rows] == result.key.marked_indices.tolist()
    psnrs = []
    for row in rows:
        original, label, _ = private[row["index"]]
        assert label == row["label"]
        for prefix in ("", "twin_"):
            path = result.marked_dir / row[f"{prefix}file"]
            with Image.open(path) as im:
                im.verify()  # a valid, complete PNG
                assert im.format == "PNG"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == row[f"{prefix}sha256"]
            image = read_png(path)
            diff = image.double() - original.double()
            assert diff.abs().max() <= R
            if prefix == "":
                psnrs.append(10 * np.log10(255.0**2 / diff.square().mean().item()))
    assert np.mean(psnrs) == pytest.approx(np.mean([r["psnr"] for r in rows]), abs=1e-6)
    assert np.mean(psnrs) == pytest.approx(result.metrics["marking/psnr_mean"], abs=1e-6)
    assert result.metrics["marking/linf_max"] <= R
    # A mapping index -> PNG works as well as the marked dir.
    first = rows[0]
    by_map = MarkedDataset(private, {first["index"]: result.marked_dir / first["file"]})
    assert torch.equal(by_map[first["index"]][0], read_png(result.marked_dir / first["file"]))
    # The released dataset: marked copies where marked, originals elsewhere, same item form.
    ds = result.dataset
    assert isinstance(ds, MarkedDataset) and len(ds) == len(private)
    marked_set = set(result.marked_indices.tolist())
    for i in range(len(private)):
        img, label, index = ds[i]
        orig = private[i]
        assert img.dtype == torch.uint8 and img.shape == orig[0].shape and (label, index) == orig[1:]
        assert torch.equal(img, orig[0]) != (i in marked_set)


def test_mark_moves_features_along_the_secret_carriers(marked):
    cfg, result, dm = marked
    key = load_key(result.key_path)
    phi = load_marking_network(key.meta)  # rebuilt from the key alone, checksum verified
    space = PixelSpace(key.meta["marking_net"]["mean"], key.meta["marking_net"]["std"])
    private = dm.dataset("private")
    idx = key.marked_indices.tolist()
    originals = torch.stack([private[i][0] for i in idx])
    released = torch.stack([result.dataset[i][0] for i in idx])
    with torch.no_grad():
        delta = phi(space.normalize_u8(released)) - phi(space.normalize_u8(originals))
    cos_own = torch.nn.functional.cosine_similarity(delta, key.image_carriers(), dim=1).mean().item()
    g = torch.Generator().manual_seed(123)
    labels = key.marked_labels
    cos_random = []
    for _ in range(300):  # fresh class carriers, as a suspect that never saw the key would have
        fresh = torch.nn.functional.normalize(torch.randn(key.num_classes, key.feature_dim, generator=g), dim=1)
        cos_random.append(torch.nn.functional.cosine_similarity(delta, fresh[labels], dim=1).mean().item())
    cos_random = np.asarray(cos_random)
    assert cos_own > 0.05
    assert cos_own > cos_random.max() + 0.02
    assert cos_own > cos_random.mean() + 5 * cos_random.std()
    assert result.metrics["marking/cos_mean"] == pytest.approx(cos_own, abs=1e-4)


def test_metrics_key_and_run_dir(marked, capsys):
    cfg, result, dm = marked
    metrics = read_metrics(cfg.paths.output_dir)
    for name in ("marking/n_marked", "marking/fraction", "marking/psnr_mean", "marking/psnr_min",
                 "marking/linf_max", "marking/shift_mean", "marking/cos_mean", "marking/seconds",
                 "marking/images_per_s", "marking/key_sha256", "marking_net/test_acc"):
        assert metrics.get(name) is not None, name
    assert metrics["marking/key_sha256"] == result.key_sha256
    assert hashlib.sha256(result.key_path.read_bytes()).hexdigest() == result.key_sha256
    assert result.key_path.parent == Path(cfg.paths.output_dir)
    meta = result.key.meta
    assert meta["marking_net"]["arch"] == "resnet18" and meta["feature_dim"] == 512 == result.key.feature_dim
    assert meta["twins"] is True and meta["selection"]["mode"] == "uniform"
    assert meta["split_fingerprint"] == dm.split_fingerprint()
    assert result.marking_net_path.is_file()


def test_same_seeds_same_bytes_and_resume(marked):
    cfg, result, dm = marked
    before = file_hashes(result.marked_dir)
    assert sum(p.endswith(".png") for p in before) == 60  # 30 released + 30 twins

    # Fresh re-run (marking net reused from the cache): byte-identical PNGs, manifest and key.
    shutil.rmtree(result.marked_dir)
    again, _ = run_mark(cfg)
    assert again.marked_dir == result.marked_dir and not again.reused
    assert again.metrics["marking_net/reused"] is True
    assert file_hashes(again.marked_dir) == before

    # Interrupted run: shard 2 never finished (no record, half a folder) and no final marker.
    shard_files = sorted((result.marked_dir / "released").glob("shard_*/*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files}
    record_path(result.marked_dir, 2).unlink()
    shutil.rmtree(result.marked_dir / "twins" / "shard_00002")
    (result.marked_dir / DONE).unlink()
    resumed, _ = run_mark(cfg)
    assert resumed.metrics["marking/n_marked_now"] == 8  # only shard 2 was marked again
    redone = {p for p in shard_files if p.parent.name == "shard_00002"}
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in shard_files if p not in redone)
    assert file_hashes(result.marked_dir) == before

    # Only the final marker missing: nothing is marked again.
    (result.marked_dir / DONE).unlink()
    finished, _ = run_mark(cfg)
    assert finished.metrics["marking/n_marked_now"] == 0 and file_hashes(result.marked_dir) == before
    # Complete: reused as a whole.
    reused, _ = run_mark(cfg)
    assert reused.reused and reused.key_sha256 == result.key_sha256


def test_fraction_zero_still_makes_a_key(tmp_path, data_root, marked):
    cfg0, result0, _ = marked
    # Share the trained marking network (same data, split and network config) to stay fast.
    shutil.copytree(Path(cfg0.paths.cache_dir) / "marking_net", tmp_path / "cache" / "marking_net")
    cfg = compose_cfg(tmp_path, data_root, "marking.fraction=0")
    result, dm = run_mark(cfg)
    assert result.key_path.is_file() and result.key.n_marked == 0
    assert torch.equal(result.key.carriers, result0.key.carriers)  # same key seed, same carriers
    private = dm.dataset("private")
    assert all(torch.equal(result.dataset[i][0], private[i][0]) for i in range(len(private)))
    assert result.metrics["marking/n_marked"] == 0 and result.metrics["marking/psnr_mean"] is None


def test_pca_carriers_no_twins_per_class(tmp_path, data_root, marked):
    cfg0, _, _ = marked
    shutil.copytree(Path(cfg0.paths.cache_dir) / "marking_net", tmp_path / "cache" / "marking_net")
    cfg = compose_cfg(tmp_path, data_root, "marking.carriers=pca:8", "marking.twins=false",
                      "marking.selection=per_class", "marking.fraction=0.2", "marking.augmentation=center",
                      "marking.steps=3")
    result, dm = run_mark(cfg)
    key = result.key
    assert key.basis is not None and key.basis.shape == (8, 512) and key.carrier_dim == 8
    assert not key.twins and torch.equal(key.carriers, key.carriers_a)
    inside = key.carriers @ key.basis.T @ key.basis  # projection onto the basis' span
    assert torch.allclose(inside, key.carriers, atol=1e-5)
    per_class = np.bincount(dm.labels("private"), minlength=10)
    expected = [int(np.floor(0.2 * n + 0.5)) for n in per_class]  # round(q * n_c) in every class
    assert np.bincount(key.marked_labels.numpy(), minlength=10).tolist() == expected
    rows = read_manifest(result.manifest_path)
    assert len(rows) == sum(expected) and "twin_file" not in rows[0]
    assert not (result.marked_dir / "twins").exists()


def test_noise_twins_are_antipodal_within_budget_and_follow_the_coin(tmp_path, data_root, marked):
    cfg0, _, _ = marked
    shutil.copytree(Path(cfg0.paths.cache_dir) / "marking_net", tmp_path / "cache" / "marking_net")
    cfg = compose_cfg(tmp_path, data_root, "marking=noise")
    result, dm = run_mark(cfg)
    private = dm.dataset("private")
    rows = read_manifest(result.manifest_path)
    assert len(rows) == result.key.n_marked > 4
    coins = dict(zip(result.key.marked_indices.tolist(), result.key.coins.tolist(), strict=True))
    steps = []
    for row in rows:
        x = private[int(row["index"])][0].float()
        released = read_png(result.marked_dir / row["file"]).float() - x
        twin = read_png(result.marked_dir / row["twin_file"]).float() - x
        assert released.abs().max() <= R and twin.abs().max() <= R
        # Away from the clipped ends of [0, 255] the twin is the released mark's antipode, +-R on every pixel,
        # the same luminance pattern on all channels.
        inside = (x >= R) & (x <= 255 - R)
        assert torch.equal(released[inside], -twin[inside]) and set(released[inside].abs().unique().tolist()) == {R}
        assert torch.equal(released[0], released[1]) and torch.equal(released[0], released[2])
        # The released sign is the pattern's when the coin is 0: the pattern is fixed by (seed, image index).
        pattern = noise_pattern(resolve_seeds(cfg.seeds)["marking"], int(row["index"]), x.shape[-1])[0]
        sign = 1 - 2 * coins[int(row["index"])]
        assert torch.equal(released[0][inside[0]], (sign * R * pattern)[inside[0]])
        steps.append(released[0].flatten())
    assert not torch.equal(steps[0], steps[1])  # every image has its own pattern
    assert float(result.metrics["marking/linf_max"]) == R and result.metrics["marking/psnr_mean"] < 35


def test_noise_marks_need_twins(tmp_path, data_root):
    cfg = compose_cfg(tmp_path, data_root, "marking=noise", "marking.twins=false")
    with pytest.raises(ValueError, match="marking.twins=true"):
        run_mark(cfg)


def test_missing_pretrained_weights_fail_clearly(tmp_path, data_root):
    cfg = compose_cfg(tmp_path, data_root, f"marking.network.pretrained={tmp_path / 'nope.pt'}")
    with pytest.raises(FileNotFoundError, match="marking.network.pretrained"):
        run_mark(cfg)


def test_adam_recipe_composes(tmp_path, data_root):
    cfg = compose_cfg(tmp_path, data_root, "marking=adam")
    assert cfg.marking.optimizer == "adam" and MarkingSettings.from_cfg(cfg.marking).lr == cfg.marking.lr
    paper = compose_cfg(tmp_path, data_root)
    assert (paper.marking.optimizer, paper.marking.lr, paper.marking.radius) == ("sgd", 1.0, 10.0)


# ---------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(tmp_path, data_root):
    """trainer=ddp_cpu (2 CPU processes, each marking its own shards) == 1 process, file for file."""
    common = [
        f"data.root={data_root}", "data.download=false",
        "data.splits.public=200", "data.splits.private=60", "data.splits.heldout=40", "data.splits.test=40",
        "marking.network.epochs=2", "marking.network.batch_size=32", "marking.network.lr=0.01",
        "marking.steps=10", "marking.fraction=0.5", "marking.shard_size=8",
        "marking.batch_size=32", "logger=none", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    # One thread per process in both runs, so floating-point reductions are the same in every process.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(name: str, *extra: str) -> Path:
        cache = tmp_path / name / "cache"
        cmd = [sys.executable, "-m", "radmark.marking.cli", *common, f"paths.cache_dir={cache}",
               f"hydra.run.dir={tmp_path / name / 'run'}", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return cache

    one = cli("one")
    # The same marking network for both (training it with DDP would legitimately differ).
    shutil.copytree(one / "marking_net", tmp_path / "two" / "cache" / "marking_net")
    two = cli("two", "trainer=ddp_cpu")
    (dir_one,), (dir_two,) = list((one / "marked").iterdir()), list((two / "marked").iterdir())
    assert dir_one.name == dir_two.name
    h1, h2 = file_hashes(dir_one), file_hashes(dir_two)
    h1.pop("key.safetensors"), h2.pop("key.safetensors")  # metadata names each cache's checkpoint path
    assert h1 == h2 and sum(p.endswith(".png") for p in h1) == 60
    assert keys_equal(load_key(dir_one / "key.safetensors"), load_key(dir_two / "key.safetensors"))
    metrics = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())
    assert metrics["marking/n_marked"] == 30
