"""Calibration: on models that never trained on marked data, are the p-values uniform?

``python -m radmark.detection.calibrate +experiment=smoke`` (``make calibrate``) composes the same config as
``radmark.run``, builds the marked data (key, twins) and then tests models under H0:

- ``marking_net``: the marking network itself (trained on the public split only);
- ``clean_victim``: a victim trained with ``victim.*`` on the *unmarked* private split (it has seen the
  originals of the marked images, not the marks);
- ``random_init``: an untrained ``victim.arch``.

White-box: for each model, the secret key is replaced by ``detection.calibration_keys`` fresh random keys
(:func:`radmark.detection.stats.random_carriers`, generator seeded by ``seeds.detection``); the features and
the alignment are computed once per model. Black-box: the same number of fresh secret coin draws over the
same twins (under H0 the coin is the only randomness). ``detection.align_probes`` and
``detection.blackbox_views`` apply as in detection (the probes are built once, shared by all models and
keys). Reported: KS statistic vs U(0,1) and FPR at 0.05 / 0.01, per model and pooled; ``calibration.json``
and ``calibration_hist.png`` in the run dir.

The black-box statistic is ``detection.blackbox_stat`` (sign or signed_rank). Both p-values are discrete,
hence conservative (FPR <= alpha) and not exactly uniform; the KS statistic is computed on the randomised
p-value P(T > t) + U P(T = t), which is exactly U(0,1) under H0.
Optional overrides: ``+calibrate.models=[marking_net,random_init]`` (skip training the clean victim).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from radmark.config import choice_name, derive_seed, resolve_seeds
from radmark.detection import stats
from radmark.detection.api import marking_view, suspect_view, twin_pairs
from radmark.detection.blackbox import coin_null_pvalues, twin_losses, twin_test
from radmark.detection.probes import make_probes, probe_settings, torch_device
from radmark.detection.whitebox import (
    WhiteboxDetector,
    detection_trainer,
    extract_features,
    heldout_loader,
    with_probes,
)
from radmark.io import write_json

log = logging.getLogger(__name__)

MODELS = ("marking_net", "clean_victim", "random_init")
RESULT_FILE = "calibration.json"
PLOT_FILE = "calibration_hist.png"


def _suspects(cfg: DictConfig, dm: Any, marked: Any, run_dir: Path, models: list[str]) -> dict[str, Any]:
    """(model, meta) per H0 model name."""
    from radmark.models import build_model, load_checkpoint, read_meta

    out: dict[str, Any] = {}
    for name in models:
        if name == "marking_net":
            out[name] = load_checkpoint(marked.marking_net_path)[0], read_meta(marked.marking_net_path)
        elif name == "clean_victim":
            from radmark.victim.train import train_victim

            res = train_victim(cfg, dm, dm.dataset("private"), run_dir / "clean_victim")
            out[name] = load_checkpoint(res.checkpoint)[0], read_meta(res.checkpoint)
        elif name == "random_init":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(resolve_seeds(cfg.seeds)["detection"])
                model = build_model(str(cfg.victim.arch), int(cfg.data.num_classes),
                                    small_input=bool(cfg.victim.small_input))
            out[name] = model.eval(), {"arch": str(cfg.victim.arch)}
        else:
            raise ValueError(f"calibrate.models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    return out


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    """Run the calibration described in the module docstring; returns the report (also written as JSON)."""
    from radmark.marking.api import mark
    from radmark.pipeline import make_datamodule

    start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = resolve_seeds(cfg.seeds)
    n_keys = int(cfg.detection.calibration_keys)
    models = [str(m) for m in OmegaConf.select(cfg, "calibrate.models", default=list(MODELS))]

    dm = make_datamodule(cfg, seeds)
    marked = mark(cfg, dm, run_dir)
    key = marked.key
    marking = marking_view(key)
    pairs = twin_pairs(marked.marked_dir, key) if key.twins else None
    trainer = detection_trainer(str(cfg.trainer.accelerator))
    loader = heldout_loader(dm.dataset("heldout"), int(cfg.detection.n_heldout))
    C, k_dim = key.num_classes, key.carrier_dim
    n_probes, n_views = int(cfg.detection.align_probes), int(cfg.detection.blackbox_views)
    blackbox_stat = choice_name(cfg.detection.blackbox_stat)
    # Probes depend on the held-out images, the marking net and seeds.detection only: built once, shared by
    # every model and every fresh key (see radmark.detection.probes).
    probes = None
    if n_probes > 0:
        probes = make_probes(marking, loader.dataset, n_probes, seeds["detection"], probe_settings(key),
                             key.basis, torch_device(str(cfg.trainer.accelerator)))

    per_model: dict[str, Any] = {}
    for name, (model, meta) in _suspects(cfg, dm, marked, run_dir, models).items():
        suspect = suspect_view(model, meta, cfg.detection.classifier_module, dm.mean, dm.std, dm.image_size)
        detector = WhiteboxDetector(marking, suspect, key.carriers)
        fm, fs = with_probes(detector, *extract_features(detector, loader, trainer), probes, trainer)
        aligned = detector.aligned_rows(fm, fs)
        # One stream per (model, test): a model's draws do not depend on which other models ran.
        gen = torch.Generator().manual_seed(derive_seed(seeds["detection"], f"whitebox:{name}"))
        # Fresh keys drawn in the carriers' own space (K-dim for pca:K keys, compared inside the basis).
        wb_p = []
        for _ in range(n_keys):
            u = stats.random_carriers(C, k_dim, gen)
            if key.basis is not None:
                u = (u.double() @ key.basis.double()).float()
            wb_p.append(10.0 ** detector.test(fm, fs, u, basis=key.basis, aligned=aligned)["log10_p"])
        entry: dict[str, Any] = {
            "secret_key_whitebox_log10_p": detector.test(fm, fs, basis=key.basis)["log10_p"],
            "whitebox": stats.uniformity_report(wb_p),
            "whitebox_p": wb_p,
        }
        if pairs is not None:
            rel, twin = twin_losses(suspect, pairs, trainer=trainer, views=n_views, seed=seeds["detection"])
            gen = torch.Generator().manual_seed(derive_seed(seeds["detection"], f"blackbox:{name}"))
            null = coin_null_pvalues(rel, twin, n_keys, gen, statistic=blackbox_stat)
            entry["secret_coins_blackbox"] = twin_test(rel, twin, blackbox_stat)
            entry["blackbox_randomized"] = stats.uniformity_report(null["p_randomized"])
            entry["blackbox"] = stats.uniformity_report(null["p"])
            entry["blackbox_p"] = null["p"].tolist()
            entry["blackbox_p_randomized"] = null["p_randomized"].tolist()
        per_model[name] = entry

    pooled: dict[str, Any] = {"whitebox": stats.uniformity_report(
        np.concatenate([e["whitebox_p"] for e in per_model.values()]))}
    if pairs is not None:
        pooled["blackbox"] = stats.uniformity_report(np.concatenate([e["blackbox_p"] for e in per_model.values()]))
        pooled["blackbox_randomized"] = stats.uniformity_report(
            np.concatenate([e["blackbox_p_randomized"] for e in per_model.values()]))
    from radmark.pipeline import command_line, variant_label

    report = {
        "variant": variant_label(cfg),
        "command": command_line(),
        "n_keys": n_keys,
        "models": models,
        "n_heldout": len(loader.dataset),  # type: ignore[arg-type]
        "n_twins": len(pairs) if pairs is not None else 0,
        "align_probes": n_probes,
        "blackbox_views": n_views,
        "blackbox_stat": blackbox_stat,
        "carrier_dim": k_dim,
        "num_classes": C,
        "seed_detection": seeds["detection"],
        "key_sha256": marked.key_sha256,
        "per_model": per_model,
        "pooled": pooled,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(run_dir / RESULT_FILE, report)
    plot(report, run_dir / PLOT_FILE)
    print(table(report))
    print(f"calibration: {run_dir / RESULT_FILE}, {run_dir / PLOT_FILE}")
    return report


def table(report: dict[str, Any]) -> str:
    """Plain-text table: one row per (test, model) and pooled."""
    head = f"{'test':<22}{'model':<14}{'n':>6}{'KS':>8}{'KS p':>9}{'FPR.05':>9}{'FPR.01':>9}"
    lines = [f"calibration under H0: {report['n_keys']} fresh keys / coin draws per model, "
             f"{report['n_heldout']} held-out images, {report['n_twins']} twin pairs "
             f"({report.get('blackbox_stat', 'sign')} test)", head, "-" * len(head)]
    rows = [("white-box", "whitebox"), ("black-box", "blackbox"), ("black-box randomised", "blackbox_randomized")]
    for label, field in rows:
        entries = [(m, e.get(field)) for m, e in report["per_model"].items()] + [("pooled", report["pooled"].get(field))]
        for model, r in entries:
            if r is None:
                continue
            lines.append(f"{label:<22}{model:<14}{r['n']:>6}{r['ks_stat']:>8.3f}{r['ks_pvalue']:>9.3f}"
                         f"{r['fpr_05']:>9.3f}{r['fpr_01']:>9.3f}")
    lines.append("(black-box: KS on the randomised p-value, FPR on the test's conservative p-value)")
    for model, e in report["per_model"].items():
        bb = e.get("secret_coins_blackbox")
        bb_text = f", black-box {bb['log10_p']:.2f} ({bb['wins']}/{bb['n']})" if bb else ""
        lines.append(f"secret key on {model}: white-box log10 p {e['secret_key_whitebox_log10_p']:.2f}{bb_text}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Histograms of the null p-values (white-box; black-box randomised) against the uniform density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("white-box p (fresh keys)", "whitebox_p"), ("black-box p, randomised (fresh coins)",
                                                          "blackbox_p_randomized")]
    panels = [p for p in panels if any(p[1] in e for e in report["per_model"].values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, (title, field) in zip(axes[0], panels, strict=True):
        data = [np.asarray(e[field]) for e in report["per_model"].values() if field in e]
        labels = [m for m, e in report["per_model"].items() if field in e]
        ax.hist(data, bins=bins, stacked=True, label=labels, density=False)
        total = sum(len(d) for d in data)
        ax.axhline(total / (len(bins) - 1), color="k", ls="--", lw=1, label="uniform")
        ax.set_xlabel("p-value")
        ax.set_ylabel("count")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    from radmark.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


@hydra.main(config_path="../../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    calibrate(cfg)


if __name__ == "__main__":
    main()
