"""The whole job through its plain functions and through the CLI, on tiny fake data; tables from runs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fakedata import write_fashion_mnist_idx
from helpers import compose_config
from radmark.pipeline import run_experiment
from radmark.report import write_report

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.splits.public=200", "data.splits.private=100", "data.splits.heldout=60", "data.splits.test=60",
    "data.batch_size=32", "marking.steps=4", "marking.network.epochs=1", "marking.network.batch_size=32",
    "victim.epochs=1", "victim.batch_size=32", "detection.n_heldout=60", "logger=csv",
]
KEYS = ("marking/psnr_mean", "marking/linf_max", "victim/test_acc", "detect/whitebox_log10_p",
        "detect/blackbox_log10_p")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    write_fashion_mnist_idx(root, n_train=400, n_test=80, seed=3)
    return root


def test_run_experiment_writes_every_stage(tmp_path, data_root, capsys):
    paths = [f"data.root={data_root}", f"paths.cache_dir={tmp_path / 'cache'}", "paths.data_dir=unused",
             "paths.root_dir=."]
    cfg = compose_config(["+experiment=smoke", *TINY, *paths, f"paths.output_dir={tmp_path / 'run1'}"])
    metrics = run_experiment(cfg)
    for key in KEYS:
        assert math.isfinite(metrics[key]), key
    assert metrics["marking/linf_max"] <= cfg.marking.radius
    assert metrics["git/sha"] and "seeds/selection" in metrics and metrics["config/marking.fraction"] == 0.1
    on_disk = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert on_disk == metrics
    assert (tmp_path / "run1" / "marked_examples.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "white-box   log10 p" in out and str(tmp_path / "run1") in out

    # Another training seed: same key and marked data (reused from the cache), a different victim.
    cfg2 = compose_config(["+experiment=smoke", *TINY, *paths, f"paths.output_dir={tmp_path / 'run2'}",
                     "seeds.train=7"])
    metrics2 = run_experiment(cfg2)
    assert metrics2["marking/reused"] is True
    assert metrics2["marking/key_sha256"] == metrics["marking/key_sha256"]
    assert metrics2["marking/marked_dir"] == metrics["marking/marked_dir"]
    assert metrics2["seeds/train"] == 7 != metrics["seeds/train"]


def test_report_builds_table_from_metrics_files(tmp_path):
    for arch, base_acc in (("resnet18", 0.9), ("vgg16", 0.8)):
        for fraction in (0.0, 0.01, 0.1):
            run = tmp_path / "runs" / f"{arch}-{fraction}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({
                "config/victim.arch": arch, "config/marking.fraction": fraction,
                "detect/whitebox_log10_p": -10 * fraction, "detect/blackbox_log10_p": -5 * fraction,
                "victim/test_acc": base_acc - fraction, "victim/train_acc": 0.95, "marking/psnr_mean": 40.0,
            }))
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "metrics.json").write_text(json.dumps({"config/victim.arch": "x"}))
    md = write_report(tmp_path / "runs", tmp_path / "out", "t", "make reproduce-table")
    text = md.read_text()
    assert "Produced by: `make reproduce-table`" in text and "## vgg16" in text and "## x" not in text
    rows = list(csv.DictReader(open(tmp_path / "out" / "t.csv")))
    assert len(rows) == 6
    ten = next(r for r in rows if r["arch"] == "resnet18" and float(r["percent_marked"]) == 10)
    assert float(ten["acc_change"]) == pytest.approx(-10.0)
    assert float(ten["detect/whitebox_log10_p"]) == pytest.approx(-1.0)
    assert (tmp_path / "out" / "t_log10p.png").stat().st_size > 0


@pytest.mark.slow
def test_two_point_sweep_and_table(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "radmark.run", "-m", "+experiment=smoke", *TINY,
           f"data.root={data_root}", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
           "marking.fraction=0,0.1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    subdirs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert subdirs == ["marking.fraction=0", "marking.fraction=0.1"]
    md = write_report(sweep, tmp_path / "results", "smoke", " ".join(cmd[2:]))
    rows = list(csv.DictReader(open(tmp_path / "results" / "smoke.csv")))
    assert [float(r["percent_marked"]) for r in rows] == [0.0, 10.0]
    for row in rows:
        for key in ("detect/whitebox_log10_p", "detect/blackbox_log10_p", "victim/test_acc"):
            assert math.isfinite(float(row[key])), (row, key)
    assert (tmp_path / "results" / "smoke_examples.png").is_file()
    assert "## resnet18" in md.read_text()


def _power_run(folder, name: str, fraction: float, epochs: int, **metrics) -> None:
    """A fake finished run's metrics.json (ResNet-18 victim unless ``metrics`` says otherwise)."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "config/victim.arch": "resnet18", "config/marking.fraction": fraction, "config/marking.name": name,
        "run/command": f"python -m radmark.run marking={name}", "detect/blackbox_log10_p": -0.1,
        "victim/test_acc": 0.9, "victim/train_acc": 0.95, "victim/epochs": epochs, "config/victim.epochs": epochs,
        "marking/psnr_mean": 40.0, **metrics,
    }))


def test_power_report_groups_runs_by_variant(tmp_path):
    for name, wb, epochs in (("paper", -0.5, 10), ("strong", -3.0, 10), ("strong", -60.0, 100)):
        for fraction in (0.0, 0.1):
            _power_run(tmp_path / "runs" / f"{name}-{epochs}-{fraction}", name, fraction, epochs,
                       **{"detect/whitebox_log10_p": wb * fraction})
    # A second seed of the 100-epoch strong row: the row shows the mean and each run's value.
    _power_run(tmp_path / "runs" / "strong-100-0.1-seed1", "strong", 0.1, 100, **{
        "run/command": "python -m radmark.run marking=strong seeds.root=1", "detect/whitebox_log10_p": -2.0,
        "detect/blackbox_log10_p": -0.3, "detect/blackbox_wins": 9, "detect/blackbox_n": 15})
    calib = tmp_path / "calib" / "strong"
    calib.mkdir(parents=True)
    report = {"n": 200, "ks_stat": 0.05, "ks_pvalue": 0.6, "fpr_05": 0.05, "fpr_01": 0.01}
    (calib / "calibration.json").write_text(json.dumps({
        "variant": "marking=strong carriers=sphere selection=uniform | detection=paper probes=0 views=1 stat=sign",
        "command": "python -m radmark.detection.calibrate marking=strong",
        "pooled": {"whitebox": report, "blackbox": report, "blackbox_randomized": report},
    }))
    from radmark.report import write_power_report

    text = write_power_report([tmp_path / "runs"], tmp_path / "calib", tmp_path / "power.md").read_text()
    # One section per (variant, victim recipe): a longer-trained victim is not averaged with a short one.
    assert text.count("## `marking=") == 3
    strong = text[text.index("## `marking=strong"):]
    strong_10, strong_100 = strong.split("victim epochs=10 ")[1], strong.split("victim epochs=100 ")[1]
    assert "| 10 | 1 | -0.30 |" in strong_10.split("## ")[0]
    assert "| 10 | 2 | -4.00 (-6.00, -2.00) | -0.20 (-0.10, -0.30) |" in strong_100.split("## ")[0]
    assert "(9/15)" in strong_100 and "seeds.root=1" in strong_100
    assert strong.count("KS p 0.60, FPR 0.050/0.010") == 4  # both tests, in both strong sections
    assert "python -m radmark.run marking=strong" in strong
    paper = text[text.index("## `marking=paper"):text.index("## `marking=strong")]
    assert "not run" in paper
    # Other victim architectures (transfer) get their own sections, after the main one's, only when asked.
    _power_run(tmp_path / "runs" / "transfer-densenet", "strong", 0.1, 100, **{
        "config/victim.arch": "densenet121", "run/command": "python -m radmark.run marking=strong victim=densenet121",
        "detect/whitebox_log10_p": -1.0, "detect/blackbox_log10_p": -5.0})
    assert "densenet121" not in write_power_report([tmp_path / "runs"], None, tmp_path / "p1.md").read_text()
    both = write_power_report([tmp_path / "runs"], None, tmp_path / "p2.md", archs=("resnet18", "densenet121"))
    text = both.read_text()
    assert text.count("**densenet121 victim**") == 1 and text.count("## `marking=") == 4
    assert text.index("**densenet121 victim**") > text.rindex("python -m radmark.run marking=strong seeds.root=1")
    # A softer mark (smaller L-inf budget) is a different variant, not another seed of the default one.
    _power_run(tmp_path / "runs" / "strong-100-0.1-radius6", "strong", 0.1, 100, **{
        "config/marking.radius": 6.0, "detect/whitebox_log10_p": -0.1, "victim/test_acc": 0.88,
        "run/command": "python -m radmark.run marking=strong marking.radius=6"})
    # The paper's clean 100-epoch run with the same training seed as the strong one is the same victim trained
    # again: it counts once in that baseline.
    for name in ("strong", "paper"):
        folder = tmp_path / "runs" / f"{name}-100-0.0"
        if folder.exists():
            metrics = json.loads((folder / "metrics.json").read_text())
            (folder / "metrics.json").write_text(json.dumps({**metrics, "seeds/train": 7}))
        else:
            _power_run(folder, name, 0.0, 100, **{"seeds/train": 7, "detect/whitebox_log10_p": -0.1})
    text = write_power_report([tmp_path / "runs"], None, tmp_path / "p3.md").read_text()
    assert text.count("radius=6 |") == 1 and text.count("## `marking=") == 5
    # It has no clean run of its own: its accuracy change is against the strong 100-epoch section's clean run
    # (same victim recipe and data; a clean victim never sees a mark), which the section names.
    softer = text[text.index("radius=6 |"):]
    assert "clean runs of the other sections" in softer and "(1 run: 90.00 %)" in softer
    assert "| 10 | 1 | -0.10 | -0.10 | -0.10 | 88.00 | -2.00 |" in softer
    # A cap on hard selection is a variant of its own too; a run recorded with hard_cap=null is not one.
    _power_run(tmp_path / "runs" / "strong-100-0.1-cap", "strong", 0.1, 100, **{
        "config/marking.hard_cap": 0.05, "config/marking.selection": "hard", "detect/whitebox_log10_p": -0.2,
        "run/command": "python -m radmark.run marking=strong marking.hard_cap=0.05"})
    metrics = json.loads((tmp_path / "runs" / "strong-100-0.1-seed1" / "metrics.json").read_text())
    (tmp_path / "runs" / "strong-100-0.1-seed1" / "metrics.json").write_text(
        json.dumps({**metrics, "config/marking.hard_cap": None}))
    text = write_power_report([tmp_path / "runs"], None, tmp_path / "p4.md").read_text()
    assert text.count("selection=hard hard_cap=0.05 |") == 1 and text.count("## `marking=") == 6
    assert "| 10 | 2 | -4.00 (-6.00, -2.00) |" in text
    # The same variant and recipe on a bigger private split is not another seed of the same row either.
    _power_run(tmp_path / "runs" / "strong-100-0.1-private5000", "strong", 0.1, 100, **{
        "config/data.splits.private": 5000, "detect/whitebox_log10_p": -0.3,
        "run/command": "python -m radmark.run marking=strong data.splits.private=5000"})
    text = write_power_report([tmp_path / "runs"], None, tmp_path / "p5.md").read_text()
    assert text.count("## `marking=") == 7 and text.count("splits=?/5000/?/?`") == 1
    assert "| 10 | 2 | -4.00 (-6.00, -2.00) |" in text
