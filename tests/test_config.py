"""Composition of the Hydra config: every experiment composes, typos fail at compose time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from helpers import compose_config
from radmark.config import resolve_seeds

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(overrides: list[str]):
    return compose_config(overrides, hydra_node=True)


def test_config_yaml_does_not_default_experiment():
    defaults = OmegaConf.load(CONF / "config.yaml").defaults
    assert not any("experiment" in str(d) for d in defaults)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    cfg = _compose([f"+experiment={name}"])
    assert cfg.experiment == name
    assert 0.0 <= cfg.marking.fraction <= 1.0
    assert cfg.victim.arch in ("resnet18", "vgg16", "vgg16_bn", "densenet121")
    for path in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()[:1]:
        assert path.strip() == "# @package _global_"


def test_resnet18_1pct_values():
    cfg = _compose(["+experiment=resnet18_1pct"])
    assert cfg.marking.fraction == 0.01
    assert cfg.victim.arch == "resnet18"


@pytest.mark.parametrize("override", ["marking.fractoin=0.1", "victim.epoch=3", "seeds.rot=1"])
def test_misspelled_keys_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        _compose(["+experiment=resnet18_1pct", override])


def test_unknown_blackbox_statistic_fails_at_compose_time():
    cfg = _compose(["+experiment=resnet18_1pct", "detection=probes"])
    assert cfg.detection.blackbox_stat.name == "signed_rank"
    assert _compose(["+experiment=resnet18_1pct"]).detection.blackbox_stat.name == "sign"  # the paper's
    with pytest.raises(ConfigCompositionException, match="blackbox_stat"):
        _compose(["+experiment=resnet18_1pct", "detection.blackbox_stat=wilcox"])


def test_misspelled_key_in_an_experiment_file_fails(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nmarking:\n  fractoin: 0.1\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="fractoin"):
            compose(config_name="config", overrides=["+experiment=typo"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        _compose(["marking.fraction=lots"])
    with pytest.raises(ConfigCompositionException, match="hard_cap"):
        _compose(["marking=strong_hard", "marking.hard_cap=half"])
    assert _compose(["marking=strong_hard", "marking.hard_cap=0.05"]).marking.hard_cap == 0.05
    assert _compose(["marking=strong_hard", "marking.hard_cap=null"]).marking.hard_cap is None
    assert _compose(["marking=strong"]).marking.hard_cap is None


def test_named_seeds_are_independent_of_the_train_seed():
    base = resolve_seeds(_compose([]).seeds)
    other = resolve_seeds(_compose(["seeds.train=123"]).seeds)
    assert other["train"] == 123
    for name in ("key", "selection", "splits", "marking"):
        assert base[name] == other[name]
    assert resolve_seeds(_compose(["seeds.root=1"]).seeds)["selection"] != base["selection"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radmark.run", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_help_lists_config_groups():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for group in ("data", "marking", "victim", "detection", "trainer", "logger", "experiment", "paths"):
        assert f"{group}:" in out.stdout


def test_cli_cfg_job_and_typo():
    out = _cli("+experiment=resnet18_1pct", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.marking.fraction == 0.01 and cfg.victim.arch == "resnet18"
    bad = _cli("+experiment=resnet18_1pct", "marking.fractoin=0.1", "--cfg", "job")
    assert bad.returncode != 0
    assert "fractoin" in bad.stderr
