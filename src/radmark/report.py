"""Tables and plots from runs' ``metrics.json`` files (never from folder names).

``python -m radmark.report --runs multirun/table --name fashion_mnist --command "make reproduce-table"``
writes ``experiments/results/<name>.md`` / ``.csv`` and ``<name>_log10p.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from radmark.config import MarkingConfig
from radmark.io import atomic_path, read_json
from radmark.metrics import METRICS_FILE

ARCH_KEY = "config/victim.arch"
FRACTION_KEY = "config/marking.fraction"
COLUMNS = (
    ("detect/whitebox_log10_p", "white-box log10 p", "{:.2f}"),
    ("detect/blackbox_log10_p", "black-box log10 p", "{:.2f}"),
    ("victim/test_acc", "acc %", "{:.2f}"),
    ("acc_change", "Δacc (pts)", "{:+.2f}"),
    ("marking/psnr_mean", "PSNR dB", "{:.1f}"),
)


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every finished run under ``root`` (one that reached detection)."""
    runs = []
    for path in sorted(Path(root).rglob(METRICS_FILE)):
        metrics = read_json(path)
        if "detect/whitebox_log10_p" in metrics and ARCH_KEY in metrics:
            runs.append(metrics)
    return runs


def _mean(values: list[Any]) -> float | None:
    """Mean over seeds of the values that exist (a test that did not run is None)."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(kept) if kept else None


def build_rows(runs: list[dict[str, Any]], clean: list[dict[str, Any]] | None = None
               ) -> tuple[list[float], list[str], dict[tuple[float, str], dict]]:
    """Cells keyed by (fraction, arch), averaged over seeds; accuracy change vs the fraction-0 runs, or vs
    ``clean`` (fraction-0 runs from elsewhere, not shown as a row) when ``runs`` has none for an arch."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(float(run[FRACTION_KEY]), str(run[ARCH_KEY]))].append(run)
    cells: dict[tuple[float, str], dict[str, Any]] = {}
    for key, members in groups.items():
        cell: dict[str, Any] = {
            col: _mean([m.get(col) for m in members]) for col, _, _ in COLUMNS if col != "acc_change"
        }
        if cell.get("victim/test_acc") is not None:
            cell["victim/test_acc"] *= 100.0
        cell["n_runs"] = len(members)
        cell["victim/train_acc"] = _mean([m.get("victim/train_acc") for m in members])
        cell["victim/epochs"] = members[0].get("victim/epochs")
        # Black-box details for the power report: the sign test beside a signed-rank primary, twins won
        # (summed over runs) and each run's primary p-value.
        cell["detect/blackbox_sign_log10_p"] = _mean(
            [m.get("detect/blackbox_sign_log10_p", m.get("detect/blackbox_log10_p")) for m in members])
        won = [(int(m["detect/blackbox_wins"]), int(m["detect/blackbox_n"])) for m in members
               if m.get("detect/blackbox_wins") is not None and m.get("detect/blackbox_n") is not None]
        cell["blackbox_wins"] = (sum(w for w, _ in won), sum(n for _, n in won)) if won else None
        cell["blackbox_per_run"] = [m.get("detect/blackbox_log10_p") for m in members]
        cell["whitebox_per_run"] = [m.get("detect/whitebox_log10_p") for m in members]
        cells[key] = cell
    borrowed = {arch: _mean([m.get("victim/test_acc") for m in (clean or []) if str(m[ARCH_KEY]) == arch])
                for _, arch in cells}
    for (_fraction, arch), cell in cells.items():
        base = cells.get((0.0, arch), {}).get("victim/test_acc")
        clean_acc = borrowed[arch]
        if base is None and clean_acc is not None:
            base = clean_acc * 100.0
        acc = cell.get("victim/test_acc")
        cell["acc_change"] = acc - base if acc is not None and base is not None else None
    fractions = sorted({f for f, _ in cells})
    archs = sorted({a for _, a in cells})
    return fractions, archs, cells


def _fmt(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def render_markdown(fractions, archs, cells, title: str, command: str, notes: str = "") -> str:
    out = io.StringIO()
    out.write(f"# {title}\n\nProduced by: `{command}`\n\n")
    if notes:
        out.write(notes.strip() + "\n\n")
    for arch in archs:
        out.write(f"## {arch}\n\n| % marked | " + " | ".join(label for _, label, _ in COLUMNS) + " | train acc % |\n")
        out.write("|---" * (len(COLUMNS) + 2) + "|\n")
        for fraction in fractions:
            cell = cells.get((fraction, arch))
            if cell is None:
                continue
            train = cell.get("victim/train_acc")
            values = [_fmt(cell.get(col), fmt) for col, _, fmt in COLUMNS]
            values.append(_fmt(train * 100 if train is not None else None, "{:.1f}"))
            out.write(f"| {fraction * 100:g} | " + " | ".join(values) + " |\n")
        out.write("\n")
    return out.getvalue()


def write_csv(path: Path, fractions, archs, cells) -> None:
    fields = ["arch", "percent_marked", *[c for c, _, _ in COLUMNS], "victim/train_acc", "n_runs"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for arch in archs:
            for fraction in fractions:
                cell = cells.get((fraction, arch))
                if cell is not None:
                    writer.writerow({"arch": arch, "percent_marked": fraction * 100,
                                     **{k: cell.get(k) for k in fields[2:]}})


def plot_log10p(path: Path, fractions, archs, cells) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (col, label) in zip(axes, (("detect/whitebox_log10_p", "white-box"),
                                       ("detect/blackbox_log10_p", "black-box")), strict=True):
        for arch in archs:
            xs = [f * 100 for f in fractions if cells.get((f, arch), {}).get(col) is not None]
            ys = [cells[(f, arch)][col] for f in fractions if cells.get((f, arch), {}).get(col) is not None]
            ax.plot(xs, ys, marker="o", label=arch)
        ax.axhline(-4, color="red", linestyle="--", linewidth=1, label="p = 1e-4")
        ax.set_xlabel("% of the private split marked")
        ax.set_title(f"{label} test")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log10 p")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def unflatten(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Inverse of :func:`radmark.metrics.flatten` for one prefix: ``config/data.splits.public`` -> nested."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key.startswith(prefix + "."):
            node = out
            *parents, leaf = key[len(prefix) + 1:].split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return out


def examples_png_for_run(metrics: dict[str, Any], out: Path) -> Path | None:
    """Original / marked / amplified-difference grid of a finished run, rebuilt from its metrics.json."""
    import shutil

    from omegaconf import OmegaConf

    from radmark.config import DataConfig
    from radmark.data.datamodule import RadmarkDataModule
    from radmark.marking.dataset import MarkedDataset
    from radmark.plots import marked_examples_png

    existing = metrics.get("marking/examples_png")
    if existing and Path(existing).is_file():
        with atomic_path(out) as tmp:
            shutil.copyfile(existing, tmp)
        return out
    marked_dir = metrics.get("marking/marked_dir")
    if not marked_dir or not (Path(marked_dir) / "manifest.csv").is_file():
        return None
    data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), unflatten(metrics, "config/data"))
    dm = RadmarkDataModule(data_cfg, split_seed=int(metrics["seeds/splits"]))
    dm.setup()
    private = dm.dataset("private")
    marked = MarkedDataset(private, marked_dir)
    return marked_examples_png(private, marked, marked.marked_indices, out)


def write_report(runs_root: str | Path, out_dir: str | Path, name: str, command: str, notes: str = "") -> Path:
    runs = collect_runs(runs_root)
    if not runs:
        raise FileNotFoundError(f"no finished runs (metrics.json with detect/ keys) under {runs_root}")
    fractions, archs, cells = build_rows(runs)
    out_dir = Path(out_dir)
    md = out_dir / f"{name}.md"
    text = render_markdown(fractions, archs, cells, f"radmark table: {name}", command, notes)
    with atomic_path(md) as tmp:
        tmp.write_text(text)
    write_csv(out_dir / f"{name}.csv", fractions, archs, cells)
    plot_log10p(out_dir / f"{name}_log10p.png", fractions, archs, cells)
    # The image grid comes from the run with the most marked images.
    richest = max(runs, key=lambda r: float(r.get(FRACTION_KEY, 0.0)))
    examples_png_for_run(richest, out_dir / f"{name}_examples.png")
    return md


def variant_of(metrics: dict[str, Any]) -> str:
    """A run's marking/detection recipe, from its recorded settings (older runs lack the newer keys; their
    defaults are the paper's)."""
    get = metrics.get
    # The pixel budget and the hard cap are shown only when not at their defaults, so older labels stay the same.
    radius = float(get("config/marking.radius", MarkingConfig.radius))
    extras = "" if radius == MarkingConfig.radius else f" radius={radius:g}"
    cap = get("config/marking.hard_cap")  # absent (older runs) or null: every marked image chosen by hardness
    extras += "" if cap is None else f" hard_cap={float(cap):g}"
    return (f"marking={get('config/marking.name', 'paper')} carriers={get('config/marking.carriers', 'sphere')} "
            f"selection={get('config/marking.selection', 'uniform')}{extras} | "
            f"detection={get('config/detection.name', 'paper')} probes={get('config/detection.align_probes', 0)} "
            f"views={get('config/detection.blackbox_views', 1)} stat={get('config/detection.blackbox_stat', 'sign')}")


def victim_recipe_of(metrics: dict[str, Any]) -> str:
    """How a run's victim was trained (the same marks can be learned or not depending on it), from its
    recorded settings; older runs lack the newer keys, whose defaults are shown."""
    get = metrics.get
    return (f"victim epochs={get('victim/epochs', get('config/victim.epochs'))} "
            f"lr={get('config/victim.lr', 0.1)} augment={get('config/victim.augment', 'crop_flip')} "
            f"small_input={get('config/victim.small_input', False)}")


def data_of(metrics: dict[str, Any]) -> str:
    """Which data a run's victim was trained on: the dataset and its split sizes (public/private/held-out/test;
    a bigger private split gives more marked images at the same fraction). Older runs without the keys show
    '?'."""
    get = metrics.get
    splits = "/".join(str(get(f"config/data.splits.{s}", "?")) for s in ("public", "private", "heldout", "test"))
    return f"data={get('config/data.name', '?')} splits={splits}"


def command_of(metrics: dict[str, Any]) -> str:
    """The command recorded by the run, or (older runs) the one its recorded settings imply."""
    if metrics.get("run/command"):
        return str(metrics["run/command"])
    return (f"python -m radmark.run +experiment={metrics.get('run/experiment')} "
            f"victim={metrics.get(ARCH_KEY)} marking.fraction={metrics.get(FRACTION_KEY)}")


def _calibration_cells(calibration: dict[str, Any] | None) -> tuple[str, str]:
    """'KS p / FPR.05 / FPR.01' for both tests of one calibration report (pooled over H0 models)."""
    if not calibration:
        return "not run", "not run"
    pooled = calibration["pooled"]

    def cell(report: dict[str, Any] | None, ks: dict[str, Any] | None) -> str:
        if not report or not ks:
            return "—"
        return f"KS p {ks['ks_pvalue']:.2f}, FPR {report['fpr_05']:.3f}/{report['fpr_01']:.3f}"

    return (cell(pooled.get("whitebox"), pooled.get("whitebox")),
            cell(pooled.get("blackbox"), pooled.get("blackbox_randomized")))


def _per_run(mean: float | None, values: list[Any]) -> str:
    """The mean over runs, followed by each run's value when there are several."""
    if len(values) <= 1:
        return _fmt(mean, "{:.2f}")
    return f"{_fmt(mean, '{:.2f}')} ({', '.join(_fmt(v, '{:.2f}') for v in values)})"


def write_power_report(runs_roots: list[str | Path], calibration_root: str | Path | None, out: str | Path,
                       archs: tuple[str, ...] = ("resnet18",), preamble: str = "") -> Path:
    """``power.md``: one section per victim architecture (in the order of ``archs``), marking/detection
    variant (:func:`variant_of`), victim recipe (:func:`victim_recipe_of`) and data (:func:`data_of`), rows = % marked,
    with both log10 p, accuracy change vs the same variant's clean baseline, PSNR, the victim's train accuracy
    and the command that made the row; plus each variant's calibration (``calibration.json`` files)."""
    runs = [r for root in runs_roots for r in collect_runs(root) if r.get(ARCH_KEY) in archs]
    if not runs:
        raise FileNotFoundError(f"no finished {'/'.join(archs)} runs under {runs_roots}")
    runs.sort(key=lambda r: archs.index(str(r[ARCH_KEY])))  # stable: keeps the folder order within an arch
    calibrations: dict[str, dict[str, Any]] = {}
    if calibration_root is not None:
        for path in sorted(Path(calibration_root).rglob("calibration.json")):
            report = read_json(path)
            if "variant" in report:
                variant = report["variant"]
                if " stat=" not in variant:  # calibrated before detection.blackbox_stat existed: the sign test
                    variant += " stat=sign"
                calibrations[variant] = report
    # Calibration is a property of the test (variant), the sections also split by victim recipe.
    by_variant: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    # A clean (0 %) victim never sees a mark, so any variant's clean runs with the same victim recipe and data
    # are a baseline for a section that has none of its own (e.g. a softer mark run at 10 and 20 % only).
    clean_runs: dict[tuple[str, str, Any], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_variant[(str(run[ARCH_KEY]), variant_of(run), victim_recipe_of(run), data_of(run))].append(run)
        if float(run[FRACTION_KEY]) == 0.0 and run.get("victim/test_acc") is not None:
            same = clean_runs[(str(run[ARCH_KEY]), victim_recipe_of(run), run.get("data/fingerprint"))]
            # Clean runs of several variants with one training seed are the same victim trained again: count it once.
            if run.get("seeds/train") is None or all(m.get("seeds/train") != run["seeds/train"] for m in same):
                same.append(run)
    text = io.StringIO()
    text.write(f"# Detection power on the CPU-sized Fashion-MNIST setting ({', '.join(archs)} victims)\n\n")
    if preamble:
        text.write(preamble.strip() + "\n\n")
    for (arch, variant, recipe, data), members in by_variant.items():
        own_clean = any(float(m[FRACTION_KEY]) == 0.0 for m in members)
        borrowed = [] if own_clean else clean_runs.get((arch, recipe, members[0].get("data/fingerprint")), [])
        fractions, _, cells = build_rows(members, clean=borrowed)
        wb_cal, bb_cal = _calibration_cells(calibrations.get(variant))
        victim = "" if arch == archs[0] else f" — **{arch} victim**"
        text.write(f"## `{variant}` — `{recipe}` — `{data}`{victim}\n\nCalibration under H0 (pooled over H0 models, fresh "
                   f"keys / coins): white-box {wb_cal}; black-box {bb_cal}")
        if variant in calibrations:
            text.write(f" — `{calibrations[variant]['command']}`")
        if borrowed:
            accs = ", ".join(f"{float(m['victim/test_acc']) * 100:.2f}" for m in borrowed)
            text.write(f". Δacc is against the clean runs of the other sections with this victim recipe and data "
                       f"({len(borrowed)} run{'s' if len(borrowed) > 1 else ''}: {accs} %)")
        text.write("\n\n| % marked | runs | white-box log10 p | black-box log10 p | black-box sign test: log10 p "
                   "(twins won) | acc % | Δacc (pts) | PSNR dB | victim epochs / train acc % | command |\n"
                   "|---|---|---|---|---|---|---|---|---|---|\n")
        commands: dict[float, list[str]] = defaultdict(list)
        for m in members:
            commands[float(m[FRACTION_KEY])].append(command_of(m))
        for fraction in fractions:
            cell = cells[(fraction, arch)]
            train = cell.get("victim/train_acc")
            won = cell.get("blackbox_wins")
            text.write(
                f"| {fraction * 100:g} | {cell['n_runs']} "
                f"| {_per_run(cell.get('detect/whitebox_log10_p'), cell['whitebox_per_run'])} "
                f"| {_per_run(cell.get('detect/blackbox_log10_p'), cell['blackbox_per_run'])} "
                f"| {_fmt(cell.get('detect/blackbox_sign_log10_p'), '{:.2f}')}"
                + (f" ({won[0]}/{won[1]})" if won else "") + " "
                f"| {_fmt(cell.get('victim/test_acc'), '{:.2f}')} | {_fmt(cell.get('acc_change'), '{:+.2f}')} "
                f"| {_fmt(cell.get('marking/psnr_mean'), '{:.1f}')} "
                f"| {cell.get('victim/epochs')} / {_fmt(train * 100 if train is not None else None, '{:.1f}')} "
                f"| {'<br>'.join(f'`{c}`' for c in commands.get(fraction, []))} |\n")
        text.write("\n")
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(text.getvalue())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, nargs="+", help="folder(s) searched recursively for metrics.json")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True, help="the command that produced the runs")
    parser.add_argument("--notes", default="", help="text (or @file) placed under the title")
    parser.add_argument("--power", action="store_true",
                        help="write <out>/<name>.md as a power table grouped by run/variant")
    parser.add_argument("--calibration", default=None, help="folder searched for calibration.json (--power)")
    parser.add_argument("--arch", nargs="+", default=["resnet18"],
                        help="victim architectures for --power, main one first (default resnet18)")
    args = parser.parse_args(argv)
    notes = Path(args.notes[1:]).read_text() if args.notes.startswith("@") else args.notes
    if args.power:
        out = write_power_report(args.runs, args.calibration, Path(args.out) / f"{args.name}.md",
                                 archs=tuple(args.arch), preamble=notes)
        print(out.read_text())
        return
    path = write_report(args.runs[0], args.out, args.name, args.command, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
