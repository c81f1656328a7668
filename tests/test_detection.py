"""Detection: white-box and black-box tests through real networks, the pipeline stage, the third-party CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as ss
import torch
import torchvision
from torch import nn

from helpers import random_images, random_resnet, tiny_run_config
from radmark.data.transforms import normalize, to_float01
from radmark.detection import stats
from radmark.detection.api import DetectionInputError, detect, suspect_view
from radmark.detection.blackbox import (
    TwinPairs,
    coin_null_pvalues,
    cross_entropy_tail_exact,
    sign_test,
    signed_rank_test,
    twin_losses,
    twin_test,
)
from radmark.detection.cli import main as cli_main
from radmark.detection.whitebox import (
    NetView,
    WhiteboxDetector,
    extract_features,
    heldout_loader,
    whitebox_detect,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


# ------------------------------------------------------------------------------------ white-box


def test_planted_carrier_through_resnet18_is_detected():
    """A suspect whose classifier rows are a * carriers + noise (same body as the marking net)."""
    marking = random_resnet(0)
    carriers = stats.random_carriers(10, 512, torch.Generator().manual_seed(1))
    suspect = random_resnet(0)
    with torch.no_grad():
        suspect.fc.weight.copy_(0.1 * carriers + 0.01 * torch.randn(10, 512))
    res = whitebox_detect(NetView(marking, "fc", MEAN, STD), NetView(suspect, "fc", MEAN, STD), carriers,
                          random_images(48), n_heldout=48)
    assert res["log10_p"] < -10
    assert res["cos_mean"] > 0.05
    assert len(res["cosines"]) == len(res["per_class_log10_p"]) == 10


def test_random_network_gives_uniform_pvalues_across_keys():
    """An unrelated suspect (own random body, 1000 held-out directions fit) against 40 fresh keys."""
    marking, suspect = NetView(random_resnet(0), "fc", MEAN, STD), NetView(random_resnet(1), "fc", MEAN, STD)
    det = WhiteboxDetector(marking, suspect, stats.random_carriers(10, 512, torch.Generator()))
    fm, fs = extract_features(det, heldout_loader(random_images(40), 40))
    aligned = det.aligned_rows(fm, fs)
    g = torch.Generator().manual_seed(7)
    p = np.array([10 ** det.test(fm, fs, stats.random_carriers(10, 512, g), aligned=aligned)["log10_p"]
                  for _ in range(40)])
    assert ss.kstest(p, "uniform").pvalue > 0.01
    assert p.min() > 1e-3
    # The precomputed alignment gives exactly what stats.whitebox_cosines gives.
    u = stats.random_carriers(10, 512, g)
    np.testing.assert_allclose(det.test(fm, fs, u)["cosines"], det.test(fm, fs, u, aligned=aligned)["cosines"],
                               atol=1e-9)


def test_pca_basis_compares_inside_the_subspace():
    marking, suspect = NetView(random_resnet(0), "fc", MEAN, STD), NetView(random_resnet(0), "fc", MEAN, STD)
    basis = torch.linalg.qr(torch.randn(512, 16, dtype=torch.float64))[0].T.float()  # (16, 512) orthonormal
    u = (stats.random_carriers(10, 16, torch.Generator().manual_seed(3)).double() @ basis.double()).float()
    with torch.no_grad():
        suspect.model.fc.weight.copy_(u + 0.02 * torch.randn(10, 512))
    res = whitebox_detect(marking, suspect, u, random_images(24), 24, basis=basis)
    assert res["d"] == 16 and res["d_suspect"] == 512
    assert res["log10_p"] < -5


@pytest.mark.parametrize("arch, dim", [("vgg16", 512), ("densenet121", 1024)])
def test_other_architectures_and_feature_sizes(arch, dim):
    from radmark.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, 10, small_input=True).eval()
    view = suspect_view(model, {"arch": arch}, None, MEAN, STD)
    res = whitebox_detect(NetView(random_resnet(0), "fc", MEAN, STD), view,
                          stats.random_carriers(10, 512, torch.Generator()), random_images(8), 8)
    assert res["d_suspect"] == dim and np.isfinite(res["log10_p"])


def test_named_classifier_module_for_a_custom_model():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 20), nn.ReLU()))
    model.add_module("head", nn.Linear(20, 10))
    view = suspect_view(model, None, "head", MEAN, STD)
    res = whitebox_detect(NetView(random_resnet(0), "fc", MEAN, STD), view,
                          stats.random_carriers(10, 512, torch.Generator()), random_images(30, size=8), 30)
    assert res["d_suspect"] == 20
    with pytest.raises(DetectionInputError, match="classifier"):
        suspect_view(model, None, None, MEAN, STD)


# ------------------------------------------------------------------------------------ black-box


def test_sign_test_counts_and_drops_ties():
    res = sign_test(np.array([1.0, 1.0, 2.0, 0.5]), np.array([2.0, 1.0, 1.0, 0.7]))
    assert (res["wins"], res["n"], res["ties"]) == (2, 3, 1)
    assert res["log10_p"] == pytest.approx(np.log10(0.5))


def test_loss_keeps_the_far_tail_so_confident_pairs_are_not_ties():
    logits = torch.randn(20, 10) * 3
    y = torch.randint(0, 10, (20,))
    ref = torch.nn.functional.cross_entropy(logits.double(), y, reduction="none")
    torch.testing.assert_close(cross_entropy_tail_exact(logits, y), ref)
    confident = cross_entropy_tail_exact(torch.tensor([[100.0, 0, 0], [90.0, 0, 0]]), torch.tensor([0, 0]))
    assert 0 < confident[0] < confident[1]  # F.cross_entropy gives 0 for both


def test_random_coins_give_uniform_pvalues():
    diff = np.random.default_rng(0).standard_normal(80)
    null = coin_null_pvalues(np.zeros(80), diff, 400, torch.Generator().manual_seed(0))
    assert ss.kstest(null["p_randomized"], "uniform").pvalue > 0.01
    assert np.mean(null["p"] <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    assert np.all(null["p"] >= null["p_randomized"] - 1e-12)  # the test's p-value is conservative


def test_signed_rank_uses_the_size_of_each_gap():
    # Same 6 wins of 10 for both suspects; only the second wins by more than it loses.
    rel = np.ones(10)
    small_wins = rel + np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, -0.7, -0.8, -0.9, -1.0])
    big_wins = rel + np.array([0.7, 0.8, 0.9, 1.0, 1.1, 1.2, -0.1, -0.2, -0.3, -0.4])
    a, b = signed_rank_test(rel, small_wins), signed_rank_test(rel, big_wins)
    assert a["wins"] == b["wins"] == 6 and a["sign_log10_p"] == b["sign_log10_p"]
    assert b["log10_p"] < a["sign_log10_p"] < a["log10_p"]
    assert b["signed_rank_W"] == 45.0  # ranks 5..10 won
    assert twin_test(rel, big_wins, "signed_rank")["log10_p"] == b["log10_p"]
    assert twin_test(rel, big_wins, "sign")["log10_p"] == b["sign_log10_p"]
    with pytest.raises(ValueError, match="blackbox_stat"):
        twin_test(rel, big_wins, "wilcox")


def test_random_coins_give_uniform_signed_rank_pvalues():
    # Heavy-tailed gaps with ties, as a confident suspect gives: the coin null is still exact.
    diff = np.round(np.random.default_rng(1).standard_t(2, 60), 1)
    null = coin_null_pvalues(np.zeros(60), diff, 400, torch.Generator().manual_seed(0), statistic="signed_rank")
    assert ss.kstest(null["p_randomized"], "uniform").pvalue > 0.01
    assert np.mean(null["p"] <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    assert np.all(null["p"] >= null["p_randomized"] - 1e-12)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A real tiny marking run (fake Fashion-MNIST IDX files): key, twins, marking network."""
    from radmark.config import resolve_seeds
    from radmark.marking.api import mark
    from radmark.pipeline import make_datamodule

    tmp = tmp_path_factory.mktemp("detect")
    cfg = tiny_run_config(tmp, [
        "data.splits.heldout=60", "marking.fraction=0.5", "detection.n_heldout=60",
        "detection.calibration_keys=20", "victim.epochs=1",
    ])
    dm = make_datamodule(cfg, resolve_seeds(cfg.seeds))
    result = mark(cfg, dm, tmp / "run")
    return cfg, dm, result, tmp


class Memorizer(nn.Module):
    """Synthetic suspect that 'remembers' the released images: confident on them, uniform elsewhere."""

    def __init__(self, released: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.register_buffer("images", normalize(to_float01(released), MEAN, STD))
        self.register_buffer("labels", labels)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = (x[:, None] - self.images[None]).flatten(2).abs().amax(2)
        hit = dist.min(1).values < 1e-4
        logits = torch.zeros(len(x), 10)
        logits[hit, self.labels[dist.argmin(1)][hit]] = 3.0
        return logits + 0 * self.fc(torch.zeros(len(x), 4))


def test_blackbox_detects_a_model_with_lower_loss_on_released_copies(marked):
    _, _, result, _ = marked
    pairs = TwinPairs(result.marked_dir)
    released = torch.stack([pairs[i][0] for i in range(len(pairs))])
    labels = torch.tensor([pairs[i][2] for i in range(len(pairs))])
    view = NetView(Memorizer(released, labels), "fc", MEAN, STD)
    res = sign_test(*twin_losses(view, pairs))
    assert res["wins"] == res["n"] == len(pairs) == result.key.n_marked
    assert res["log10_p"] < -5


def test_detect_stage_writes_metrics_and_per_class(marked, tmp_path):
    from radmark.models import save_checkpoint

    cfg, dm, result, _ = marked
    ckpt = save_checkpoint(random_resnet(3), tmp_path / "suspect.pt",
                           {"arch": "resnet18", "image_size": 32, "mean": list(dm.mean), "std": list(dm.std)})
    metrics = detect(cfg, dm, result, ckpt, tmp_path / "run")
    for k in ("whitebox_log10_p", "whitebox_cos_mean", "blackbox_log10_p", "blackbox_wins", "blackbox_n",
              "seconds"):
        assert metrics[f"detect/{k}"] is not None
    assert metrics["detect/blackbox_n"] <= result.key.n_marked
    per_class = json.loads((tmp_path / "run" / "detect_per_class.json").read_text())
    assert len(per_class["cosines"]) == len(per_class["log10_p"]) == 10
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["detect/whitebox_log10_p"] == metrics["detect/whitebox_log10_p"]


def test_cli_on_a_plain_torchvision_state_dict(marked, tmp_path):
    """The documented command, as a subprocess, on a state_dict radmark did not write (plain torch.save)."""
    _, _, result, _ = marked
    ckpt = tmp_path / "tv_resnet18.pth"
    torch.save(random_resnet(5).state_dict(), ckpt)
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "radmark.detection.cli", "--key", str(result.key_path), "--suspect", str(ckpt),
         "--arch", "resnet18", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "white-box: log10 p =" in proc.stdout and "black-box: log10 p =" in proc.stdout
    res = json.loads(out.read_text())
    assert np.isfinite(res["whitebox_log10_p"]) and np.isfinite(res["blackbox_log10_p"])
    assert res["blackbox_n"] + res["blackbox_ties"] == result.key.n_marked


def test_cli_class_count_mismatch_exits_2(marked, tmp_path, capsys):
    _, _, result, _ = marked
    ckpt = tmp_path / "seven.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), ckpt)
    out = tmp_path / "r.json"
    rc = cli_main(["--key", str(result.key_path), "--suspect", str(ckpt), "--arch", "resnet18", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert str(ckpt) in err and "7 output classes" in err and "10" in err


def test_cli_rejects_a_non_key_file(marked, tmp_path, capsys):
    _, _, result, _ = marked
    ckpt = tmp_path / "tv.pth"
    torch.save(random_resnet(5).state_dict(), ckpt)
    fake_key = tmp_path / "notes.txt"
    fake_key.write_text("not a key\n")
    out = tmp_path / "r.json"
    for bad in (fake_key, ckpt):
        rc = cli_main(["--key", str(bad), "--suspect", str(ckpt), "--arch", "resnet18", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and not out.exists()
        assert str(bad) in err and "not a radmark key" in err and "Fix" in err
    # Missing architecture for a bare state_dict: named in the error, exit 2.
    rc = cli_main(["--key", str(result.key_path), "--suspect", str(ckpt), "--out", str(out)])
    assert rc == 2 and "--arch" in capsys.readouterr().err and not out.exists()


def test_calibration_harness_runs(marked, tmp_path):
    from omegaconf import OmegaConf, open_dict

    from radmark.detection.calibrate import calibrate

    cfg = OmegaConf.create(OmegaConf.to_container(marked[0], resolve=False))
    OmegaConf.set_struct(cfg, True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.calibrate = {"models": ["marking_net", "random_init"]}
    report = calibrate(cfg)
    assert report["pooled"]["whitebox"]["n"] == 40
    assert report["pooled"]["blackbox_randomized"]["n"] == 40
    assert (tmp_path / "calibration.json").is_file() and (tmp_path / "calibration_hist.png").is_file()
