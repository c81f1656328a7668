"""What the issue-7 prototype scripts share: the power setting's config, the released split, result files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from radmark.io import atomic_path, write_json

ROOT = Path(__file__).resolve().parents[2]


def power_config(out: Path, overrides: list[str]) -> Any:
    """``+experiment=power`` with every path inside the repository and the run folder ``out``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "+experiment=power", "logger=none", "trainer.enable_progress_bar=false", f"paths.root_dir={ROOT}",
            f"paths.output_dir={out}", *overrides])


class ReleasedSplit(torch.utils.data.Dataset):
    """The private split as released: uint8 images (marked ones in place), items ``(image, label, index)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images.round().clamp(0, 255).to(torch.uint8)
        self.label_tensor = labels
        self.labels = labels.numpy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], int(self.label_tensor[i]), i


def pixel_budget(original: torch.Tensor, marked: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and largest L-inf change (0-255 scale) of marked images against their originals."""
    diff = marked.float() - original.float()
    mse = (diff**2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return float((10 * torch.log10(255**2 / mse)).mean()), float(diff.abs().max())


def command(script: str, args: dict[str, str]) -> str:
    return f"python experiments/power/{script} " + " ".join(f"{k}={v}" for k, v in args.items())


def save_result(out: Path, result: dict[str, Any]) -> None:
    write_json(out / "result.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1))


def write_table(runs: Path, name: str, header: list[str], row: Callable[[dict[str, Any]], str]) -> None:
    """``experiments/results/<name>.md``: ``header`` lines, then one ``row`` per ``runs/*/result.json``."""
    rows = [json.loads(p.read_text()) for p in sorted(runs.glob("*/result.json"))]
    out = ROOT / "experiments" / "results" / f"{name}.md"
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join([*header, *(row(r) for r in rows)]) + "\n")
    print(out)


def main(run: Callable[[dict[str, str]], Any], table: Callable[[], None]) -> None:
    if "--table" in sys.argv:
        table()
    else:
        torch.set_num_threads(2)
        run(dict(a.split("=", 1) for a in sys.argv[1:]))
