"""Detect a third-party model: ``python -m radmark.detection.cli --key KEY --suspect CKPT`` (or ``radmark-detect``).

The owner needs only the key file, the dataset (the held-out split is re-created from the data config and
split seed stored in the key; ``--data-root`` points at the data on this machine), the marking network the
key names (checked by sha256) and, for the black-box test, the marked dir with the released copies and
their twins. Prints log10 p of both tests and writes them to ``--out`` (JSON).

Exit codes: 0 done; 2 the inputs do not fit together (wrong key file, class-count or feature-size mismatch,
missing files) -- the message names the file and the fix, and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from radmark.detection.api import (
    DetectionInputError,
    load_suspect,
    marking_view,
    per_class_report,
    run_tests,
    summary_metrics,
    suspect_view,
    twin_pairs,
)
from radmark.detection.blackbox import STATISTICS
from radmark.io import sha256_file, write_json

EXIT_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="radmark-detect",
        description="Test whether a suspect model was trained on radioactive (marked) data. "
        "Prints log10 p of the white-box and black-box tests.",
    )
    p.add_argument("--key", required=True, type=Path, help="key file (key.safetensors) written by marking")
    p.add_argument("--suspect", required=True, type=Path,
                   help="suspect checkpoint: radmark's (.pt + .json) or a plain torchvision state_dict")
    p.add_argument("--arch", default=None, help="suspect architecture when the checkpoint has no .json "
                   "(resnet18 | vgg16 | densenet121)")
    p.add_argument("--classifier-module", default=None,
                   help="dotted name of the suspect's last nn.Linear (default: by architecture)")
    p.add_argument("--marked-dir", type=Path, default=None,
                   help="marked dir with manifest.csv, released/ and twins/ (default: the key's folder, or "
                   "the marked dir recorded in metrics.json beside the key)")
    p.add_argument("--data-root", default=None, help="dataset root on this machine (overrides the key's)")
    p.add_argument("--marking-net", type=Path, default=None,
                   help="marking network checkpoint (overrides the path in the key; sha256 must match)")
    p.add_argument("--n-heldout", type=int, default=1000, help="held-out images for the alignment")
    p.add_argument("--align-probes", type=int, default=0,
                   help="white-box: add N held-out images marked toward fresh random (key-independent) "
                   "carriers to the alignment (default 0: the paper's alignment)")
    p.add_argument("--blackbox-views", type=int, default=1,
                   help="black-box: average each loss over V random crop + flip views (default 1: centre view)")
    p.add_argument("--blackbox-stat", choices=STATISTICS, default="sign",
                   help="black-box statistic over the twin gaps: sign (wins) or signed_rank (Wilcoxon, also "
                   "uses how far each released copy beats its twin); both exact (default sign)")
    p.add_argument("--detection-seed", type=int, default=None,
                   help="seed of the probes' carriers and the views (default: the pipeline's seeds.detection "
                   "for seeds.root=0)")
    p.add_argument("--suspect-mean", type=float, nargs=3, default=None,
                   help="suspect's input normalisation mean (default: its .json, else the data's)")
    p.add_argument("--suspect-std", type=float, nargs=3, default=None, help="as --suspect-mean, for std")
    p.add_argument("--no-whitebox", action="store_true", help="skip the white-box test")
    p.add_argument("--no-blackbox", action="store_true", help="skip the black-box test")
    p.add_argument("--device", default="auto", help="Lightning accelerator: auto | cpu | gpu")
    p.add_argument("--out", type=Path, default=Path("detect_result.json"), help="result JSON")
    return p.parse_args(argv)


def _load_key(path: Path) -> Any:
    from radmark.marking.key import load_key

    try:
        return load_key(path)
    except FileNotFoundError as err:
        raise DetectionInputError(f"{err}. Fix: pass the key.safetensors written by marking with --key") from err
    except ValueError as err:
        raise DetectionInputError(
            f"{err}. Fix: --key must be the key.safetensors written by radmark's marking stage"
        ) from err


def _default_marked_dir(key_path: Path) -> Path | None:
    """The key's own folder if it is a marked dir, else the marked dir in a run's metrics.json beside it."""
    from radmark.io import read_json

    if (key_path.parent / "manifest.csv").is_file():
        return key_path.parent
    metrics = key_path.parent / "metrics.json"
    if metrics.is_file():
        recorded = read_json(metrics).get("marking/marked_dir")
        if recorded and (Path(recorded) / "manifest.csv").is_file():
            return Path(recorded)
    return None


def _heldout(key: Any, data_root: str | None) -> tuple[Any, Any]:
    """The held-out split of the key's dataset, re-created from the key's data config and split seed."""
    from omegaconf import OmegaConf

    from radmark.data.datamodule import RadmarkDataModule

    data = dict(key.meta.get("data") or {})
    if not data or "split_seed" not in key.meta:
        raise DetectionInputError(f"key {key.path} records no data config / split seed")
    if data_root is not None:
        data["root"] = str(data_root)
    data_cfg = OmegaConf.create(data)
    try:
        dm = RadmarkDataModule(data_cfg, split_seed=int(key.meta["split_seed"]))
        dm.setup()
    except (FileNotFoundError, ValueError) as err:
        raise DetectionInputError(f"{err}\n(the data recorded in key {key.path}; point --data-root at it)") from err
    recorded = key.meta.get("split_fingerprint")
    if recorded and dm.split_fingerprint() != recorded:
        raise DetectionInputError(
            f"the dataset at {data_cfg.root} does not give the splits key {key.path} was made on "
            f"(split fingerprint {dm.split_fingerprint()} != {recorded}): held-out images could be marked "
            "ones. Fix: --data-root must point at the same dataset files"
        )
    return dm, data_cfg


def detect_third_party(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the CLI does except printing; raises DetectionInputError on unfit inputs."""
    key = _load_key(args.key)
    marking = marking_view(key, args.marking_net)
    model, meta = load_suspect(args.suspect, arch=args.arch, num_classes=key.num_classes)
    data_cfg: Any = key.meta.get("data") or {}
    if args.suspect_mean:
        meta["mean"] = list(args.suspect_mean)
    if args.suspect_std:
        meta["std"] = list(args.suspect_std)
    suspect = suspect_view(model, meta, args.classifier_module, data_cfg.get("mean", [0.5] * 3),
                           data_cfg.get("std", [0.5] * 3), data_cfg.get("image_size"))
    heldout = None
    classes = None
    if not args.no_whitebox:
        dm, _ = _heldout(key, args.data_root)
        heldout, classes = dm.dataset("heldout"), dm.classes
    pairs, reason = None, None
    if not args.no_blackbox and key.twins:
        marked_dir = args.marked_dir or _default_marked_dir(args.key)
        if marked_dir is None:
            reason = (f"no marked dir found next to {args.key}; pass --marked-dir (the folder with "
                      "manifest.csv, released/, twins/)")
        else:
            pairs = twin_pairs(marked_dir, key)
    if args.align_probes < 0 or args.blackbox_views < 1:
        raise DetectionInputError("--align-probes must be >= 0 and --blackbox-views >= 1")
    seed = args.detection_seed
    if seed is None:
        from radmark.config import SeedsConfig, resolve_seeds

        seed = resolve_seeds(SeedsConfig())["detection"]
    result = run_tests(key, marking, suspect, heldout, args.n_heldout, pairs,
                       whitebox=not args.no_whitebox, blackbox=not args.no_blackbox,
                       accelerator=args.device, blackbox_reason=reason, align_probes=args.align_probes,
                       blackbox_views=args.blackbox_views, seed=int(seed), blackbox_stat=args.blackbox_stat)
    return {
        "key": str(args.key),
        "key_sha256": sha256_file(args.key),
        "suspect": str(args.suspect),
        "suspect_sha256": sha256_file(args.suspect),
        "suspect_arch": meta.get("arch"),
        "detection_seed": int(seed),
        **{k.split("/", 1)[1]: v for k, v in summary_metrics(result).items()},
        "per_class": per_class_report(result, classes),
        "blackbox": result["blackbox"],
    }


def format_result(res: dict[str, Any]) -> str:
    lines = []
    wb, bb = res["whitebox_log10_p"], res["blackbox_log10_p"]
    if wb is not None:
        pc = res["per_class"]
        lines.append(f"white-box: log10 p = {wb:.3f}  (mean cosine {res['whitebox_cos_mean']:.4f}, "
                     f"{len(pc['cosines'])} classes, d = {pc['d']}, {pc['n_heldout']} held-out images"
                     + (f" + {pc['n_probes']} probes" if pc.get("n_probes") else "") + ")")
    else:
        lines.append("white-box: not run")
    if bb is not None:
        views = res.get("blackbox_views") or 1
        stat = "signed-rank" if res.get("blackbox_stat") == "signed_rank" else "sign"
        lines.append(f"black-box: log10 p = {bb:.3f}  ({stat} test; lower loss on the released copy for "
                     f"{res['blackbox_wins']} of {res['blackbox_n']} twin pairs, "
                     f"{res['blackbox_ties']} ties dropped" + (f", {views} views" if views > 1 else "") + ")")
    else:
        lines.append(f"black-box: not run ({res['blackbox_reason']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    try:
        res = detect_third_party(args)
    except DetectionInputError as err:
        print(f"radmark-detect: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    write_json(args.out, res)  # atomic: a failed run never leaves a partial result
    print(format_result(res))
    print(f"result written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
