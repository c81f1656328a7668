"""Measurable variants (issue 7): hard selection, alignment probes, multi-view black-box, named configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import compose_config, random_images, random_resnet, tiny_run_config
from radmark.config import resolve_seeds
from radmark.detection import stats
from radmark.detection.api import detect, run_tests
from radmark.detection.blackbox import TwinPairs, apply_view, sign_test, twin_losses
from radmark.detection.cli import main as cli_main
from radmark.detection.probes import make_probes, probe_settings
from radmark.detection.whitebox import (
    NetView,
    WhiteboxDetector,
    extract_features,
    heldout_loader,
    with_probes,
)
from radmark.marking.key import make_key
from radmark.marking.module import MarkingSettings
from radmark.marking.selection import n_of, select_marked

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
TINY = MarkingSettings(optimizer="adam", lr=0.01, steps=3, batch_size=32)


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A real tiny marking run with ``marking.selection=hard`` (fake Fashion-MNIST)."""
    from radmark.marking.api import mark
    from radmark.pipeline import make_datamodule

    tmp = tmp_path_factory.mktemp("variants")
    cfg = tiny_run_config(tmp, [
        "data.splits.heldout=30", "marking.fraction=0.25", "marking.selection=hard", "detection.n_heldout=30",
    ])
    dm = make_datamodule(cfg, resolve_seeds(cfg.seeds))
    return cfg, dm, mark(cfg, dm, tmp / "run")


# ------------------------------------------------------------------------------------ selection


def test_uniform_and_per_class_unchanged_and_ignore_scores():
    labels = np.arange(200) % 10
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(5)).numpy()
    expected = np.sort(perm[: n_of(0.1, 200)])
    scores = np.random.default_rng(0).random(200)
    np.testing.assert_array_equal(select_marked(labels, 0.1, "uniform", 5), expected)
    np.testing.assert_array_equal(select_marked(labels, 0.1, "uniform", 5, scores), expected)
    np.testing.assert_array_equal(select_marked(labels, 0.1, "per_class", 5, scores),
                                  select_marked(labels, 0.1, "per_class", 5))


def test_hard_selection_ties_follow_the_seed_and_scores_are_required():
    labels = np.arange(100) % 10
    flat = np.zeros(100)
    for q in (0.05, 0.3):  # all scores tied: the seeded permutation decides, i.e. uniform
        np.testing.assert_array_equal(select_marked(labels, q, "hard", 3, flat), select_marked(labels, q, "uniform", 3))
    with pytest.raises(ValueError, match="score"):
        select_marked(labels, 0.1, "hard", 3)


def test_hard_cap_takes_the_hardest_then_fills_uniformly_nested():
    labels = np.arange(200) % 10
    scores = np.random.default_rng(1).random(200)
    hardest = select_marked(labels, 0.05, "hard", 4, scores)  # the 10 hardest
    # Up to the cap it is plain hard selection, and the cap of 1 is no cap at all.
    for q in (0.02, 0.05):
        np.testing.assert_array_equal(select_marked(labels, q, "hard", 4, scores, hard_cap=0.05),
                                      select_marked(labels, q, "hard", 4, scores))
    np.testing.assert_array_equal(select_marked(labels, 0.3, "hard", 4, scores, hard_cap=1.0),
                                  select_marked(labels, 0.3, "hard", 4, scores))
    capped = [select_marked(labels, q, "hard", 4, scores, hard_cap=0.05) for q in (0.05, 0.1, 0.2, 0.5)]
    assert [len(c) for c in capped] == [10, 20, 40, 100]
    assert all(set(a) <= set(b) for a, b in zip(capped, capped[1:], strict=False))  # nested
    assert all(set(hardest) <= set(c) for c in capped)
    # Beyond the cap the rest comes from the seeded permutation, not from the next-hardest images.
    rest = np.setdiff1d(capped[2], hardest)
    assert not np.array_equal(np.sort(rest), np.setdiff1d(select_marked(labels, 0.2, "hard", 4, scores), hardest))
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(4)).numpy()
    fill = [i for i in perm if i not in set(hardest)][:30]
    np.testing.assert_array_equal(np.sort(rest), np.sort(fill))
    # Cap 0 is uniform selection.
    np.testing.assert_array_equal(select_marked(labels, 0.2, "hard", 4, scores, hard_cap=0.0),
                                  select_marked(labels, 0.2, "uniform", 4))
    with pytest.raises(ValueError, match="marking.hard_cap=0.1 only applies to marking.selection=hard"):
        select_marked(labels, 0.2, "uniform", 4, hard_cap=0.1)
    with pytest.raises(ValueError, match=r"marking.hard_cap=1.5: must be in \[0, 1\]"):
        select_marked(labels, 0.2, "hard", 4, scores, hard_cap=1.5)


def test_hard_cap_without_hard_selection_fails_before_any_training(tmp_path):
    from radmark.marking.api import mark
    from radmark.pipeline import make_datamodule

    cfg = tiny_run_config(tmp_path, ["data.splits.heldout=30", "marking.fraction=0.25", "marking.hard_cap=0.1"])
    dm = make_datamodule(cfg, resolve_seeds(cfg.seeds))
    with pytest.raises(ValueError, match="marking.hard_cap=0.1 only applies to marking.selection=hard"):
        mark(cfg, dm, tmp_path / "run")
    assert not any(Path(cfg.paths.cache_dir).glob("**/*.pt"))  # no marking network was trained


def test_hard_selection_marks_low_confidence_nested(marked):
    from radmark.marking.api import _true_class_confidence
    from radmark.marking.network import get_marking_network

    cfg, dm, result = marked
    assert result.metrics["marking/selection"] == "hard" and result.key.meta["selection"]["mode"] == "hard"
    net, _ = get_marking_network(cfg, dm)  # from the cache the marking run wrote
    scores = _true_class_confidence(cfg, dm, net)
    labels = dm.labels("private")
    seed = resolve_seeds(cfg.seeds)["selection"]
    hard = result.marked_indices
    np.testing.assert_array_equal(hard, select_marked(labels, 0.25, "hard", seed, scores))
    rest = np.setdiff1d(np.arange(len(labels)), hard)
    assert scores[hard].max() <= scores[rest].min()
    uniform = select_marked(labels, 0.25, "uniform", seed)
    assert scores[hard].mean() < scores[uniform].mean()
    sets = [set(select_marked(labels, q, "hard", seed, scores).tolist()) for q in (0.05, 0.1, 0.25, 0.5, 1.0)]
    assert all(a <= b for a, b in zip(sets, sets[1:], strict=False))
    assert [len(s) for s in sets] == [n_of(q, len(labels)) for q in (0.05, 0.1, 0.25, 0.5, 1.0)]


# ------------------------------------------------------------------------------------ alignment probes


def test_probes_do_not_depend_on_the_key():
    marking = NetView(random_resnet(0), "fc", MEAN, STD)
    heldout = random_images(6, cycle_labels=True)
    originals = heldout.tensors[0][[0, 1, 2, 3, 4, 5, 0, 1]]  # 8 probes cycle through the 6 held-out images
    meta = {"marking": {"optimizer": "adam", "lr": 0.01, "steps": 3, "batch_size": 32}}
    keys = [make_key(s, 10, 512, torch.arange(4), torch.arange(4), 20, True, meta) for s in (1, 2)]
    assert not torch.equal(keys[0].carriers, keys[1].carriers)
    probes = [make_probes(marking, heldout, 8, 11, probe_settings(k), k.basis) for k in keys]
    assert probe_settings(keys[0]).steps == 3
    assert torch.equal(probes[0].tensors[0], probes[1].tensors[0])
    assert not torch.equal(probes[0].tensors[0], originals)  # marked
    diff = probes[0].tensors[0].int() - originals.int()
    assert diff.abs().max() <= 10
    det = WhiteboxDetector(marking, NetView(random_resnet(1), "fc", MEAN, STD), keys[0].carriers)
    feats = [extract_features(det, torch.utils.data.DataLoader(p, batch_size=8)) for p in probes]
    assert torch.equal(feats[0][0], feats[1][0]) and torch.equal(feats[0][1], feats[1][1])
    other_seed = make_probes(marking, heldout, 8, 12, probe_settings(keys[0]))
    assert not torch.equal(other_seed.tensors[0], probes[0].tensors[0])


def test_probes_keep_the_null_uniform():
    """Random marking net and unrelated random suspect, probes in the alignment, 30 fresh keys."""
    marking, suspect = NetView(random_resnet(0), "fc", MEAN, STD), NetView(random_resnet(1), "fc", MEAN, STD)
    heldout = random_images(24, seed=3, cycle_labels=True)
    probes = make_probes(marking, heldout, 24, seed=7, settings=TINY)
    det = WhiteboxDetector(marking, suspect, stats.random_carriers(10, 512, torch.Generator()))
    fm, fs = with_probes(det, *extract_features(det, heldout_loader(heldout, 24)), probes)
    assert fm.shape == (48, 512) and fs.shape == (48, 512)
    aligned = det.aligned_rows(fm, fs)
    g = torch.Generator().manual_seed(9)
    log10_p = np.array([det.test(fm, fs, stats.random_carriers(10, 512, g), aligned=aligned)["log10_p"]
                        for _ in range(30)])
    assert log10_p.min() > -3
    assert abs(log10_p.mean() - (-1 / np.log(10))) < 0.3  # E[log10 U] = -0.434; sd of the mean ~0.08


# ------------------------------------------------------------------------------------ black-box views


def test_apply_view_centre_offsets_are_the_identity_and_flip_flips():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(apply_view(x, torch.tensor([0.5, 0.5, 0.9])), x.float())
    assert torch.equal(apply_view(x, torch.tensor([0.5, 0.5, 0.1])), x.float().flip(-1))
    assert apply_view(x, torch.tensor([0.0, 0.99, 0.9])).shape == x.shape


def test_blackbox_views_one_is_the_centre_view_and_views_are_shared(marked):
    _, _, result = marked
    pairs = TwinPairs(result.marked_dir)
    view = NetView(random_resnet(2), "fc", MEAN, STD)
    rel, twin = twin_losses(view, pairs)
    rel1, twin1 = twin_losses(view, pairs, views=1, seed=123)
    np.testing.assert_array_equal(rel, rel1)
    np.testing.assert_array_equal(twin, twin1)
    rel4, twin4 = twin_losses(view, pairs, views=4, seed=123)
    assert np.isfinite(rel4).all() and not np.array_equal(rel4, rel)
    np.testing.assert_array_equal(twin_losses(view, pairs, views=4, seed=123)[0], rel4)  # seeded
    # The same views for the released copy and its twin: identical copies give identical losses.
    same = [(pairs[i][0], pairs[i][0], pairs[i][2], i) for i in range(len(pairs))]
    r, t = twin_losses(view, same, views=4, seed=123)
    np.testing.assert_array_equal(r, t)
    assert sign_test(r, t)["ties"] == len(pairs)


# ------------------------------------------------------------------------------------ pipeline, CLI, configs


def test_detect_and_cli_with_probes_and_views(marked, tmp_path):
    from omegaconf import OmegaConf

    from radmark.models import save_checkpoint

    cfg, dm, result = marked
    cfg = OmegaConf.merge(cfg, {"detection": {"align_probes": 6, "blackbox_views": 2}})
    ckpt = save_checkpoint(random_resnet(3), tmp_path / "suspect.pt",
                           {"arch": "resnet18", "image_size": 32, "mean": list(dm.mean), "std": list(dm.std)})
    metrics = detect(cfg, dm, result, ckpt, tmp_path / "run")
    assert metrics["detect/whitebox_n_probes"] == 6 and metrics["detect/whitebox_n_heldout"] == 30
    assert metrics["detect/blackbox_views"] == 2 and np.isfinite(metrics["detect/blackbox_log10_p"])
    out = tmp_path / "cli.json"
    rc = cli_main(["--key", str(result.key_path), "--suspect", str(ckpt), "--out", str(out), "--device", "cpu",
                   "--n-heldout", "30", "--align-probes", "6", "--blackbox-views", "2",
                   "--detection-seed", str(resolve_seeds(cfg.seeds)["detection"])])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["per_class"]["n_probes"] == 6 and res["blackbox_views"] == 2
    # Same seed, same inputs: the CLI reproduces the pipeline.
    assert res["whitebox_log10_p"] == pytest.approx(metrics["detect/whitebox_log10_p"], abs=1e-9)
    assert res["blackbox_wins"] == metrics["detect/blackbox_wins"]
    # The defaults are the paper's test: no probes, centre view.
    paper = run_tests(result.key, *_views(result, ckpt, dm), dm.dataset("heldout"), 30, TwinPairs(result.marked_dir),
                      accelerator="cpu")
    assert paper["whitebox"]["n_probes"] == 0 and paper["blackbox"]["views"] == 1


def _views(result, ckpt, dm):
    from radmark.detection.api import load_suspect, marking_view, suspect_view

    model, meta = load_suspect(ckpt, num_classes=10)
    return marking_view(result.key), suspect_view(model, meta, None, dm.mean, dm.std, dm.image_size)


def test_named_variant_configs_compose():
    cfg = compose_config(["marking=strong", "detection=probes"])
    m, d = cfg.marking, cfg.detection
    assert m.name == "strong" and m.radius <= 10.0  # a stronger optimisation, never a larger pixel budget
    assert d.name == "probes" and d.align_probes > 0 and d.blackbox_views > 1
    MarkingSettings.from_cfg(m)
    paper = compose_config([])
    assert (paper.marking.name, paper.marking.selection, paper.marking.optimizer) == ("paper", "uniform", "sgd")
    assert (paper.detection.name, paper.detection.align_probes, paper.detection.blackbox_views) == ("paper", 0, 1)


def test_best_variant_is_one_override_and_the_demo_uses_it():
    best = compose_config(["marking=strong_hard"])
    assert (best.marking.selection, best.marking.optimizer, best.marking.radius) == ("hard", "adam", 10.0)
    assert best.marking.hard_cap == 0.1  # capped: no accuracy cost at 20 % (experiments/results/power_hard_cap.md)
    assert best.detection.name == "probes" and best.detection.blackbox_stat.name == "signed_rank"
    demo = compose_config(["+experiment=demo"])
    assert (demo.marking.selection, demo.detection.name) == ("hard", "probes")
    # The paper's recipe is one override away, and it brings back the paper's detection too.
    paper = compose_config(["+experiment=demo", "marking=paper"])
    assert (paper.marking.name, paper.marking.selection, paper.detection.name) == ("paper", "uniform", "paper")
    assert paper.detection.blackbox_stat.name == "sign"
