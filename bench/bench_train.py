"""Training throughput of the victim's Lightning loop next to a bare PyTorch loop.

Same model (ResNet-18 at 32x32), batch, optimizer (SGD momentum, weight decay) and in-memory data. Each
step is timed end to end (data fetch, forward, backward, optimizer step, and for Lightning its hooks,
logging, metrics and progress bar), after ``--warmup`` steps; the two loops alternate ``--repeats`` times.

On a shared machine other jobs only ever make a step slower, in bursts. So the headline ratio uses the
"quiet" mean step time: the mean over steps no slower than 1.5x the loop's median step (on an idle machine
that is the plain mean; Lightning's periodic work, logging and progress bar every 10 steps, costs far less
than 50 % of a step and stays in). The raw wall-clock spans are recorded too.
Writes ``bench/results/bench_train.json``.

    python bench/bench_train.py [--steps 30] [--batch-size 128] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from radmark.classifier import ClassifierModule
from radmark.config import TrainerConfig
from radmark.io import write_json
from radmark.metrics import git_state
from radmark.models import build_model
from radmark.victim.train import make_victim_trainer

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.json"
HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
QUIET = 1.5  # steps slower than this multiple of the median are counted as disturbed


def make_loader(n: int, batch_size: int, image_size: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_times(stamps: list[float], warmup: int) -> list[float]:
    """Durations of the steps after warm-up, from the end-of-step timestamps of every step."""
    return [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]


def bare_loop(args: argparse.Namespace, loader: DataLoader) -> list[float]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, small_input=args.small_input).to(args.device).train()
    opt = torch.optim.SGD(model.parameters(), **HP)
    stamps = []
    for i, (x, y) in enumerate(loader):
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(args.device)
        stamps.append(time.perf_counter())
        if i == args.warmup + args.steps - 1:
            break
    return step_times(stamps, args.warmup)


class StepStamps(pl.Callback):
    """A timestamp at the end of every training step; consecutive stamps bracket one full step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        sync(self.device)
        self.stamps.append(time.perf_counter())


def lightning_loop(args: argparse.Namespace, loader: DataLoader, root: Path) -> list[float]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, small_input=args.small_input)
    module = ClassifierModule(model, 10, epochs=1, **HP)
    cfg = OmegaConf.structured(TrainerConfig)
    cfg.accelerator = "gpu" if args.device == "cuda" else "cpu"
    cfg.precision = "32-true"  # same arithmetic as the bare loop
    cfg.enable_progress_bar = not args.no_progress_bar
    cfg.limit_train_batches = args.warmup + args.steps
    stamps = StepStamps(args.device)
    trainer = make_victim_trainer(cfg, root, epochs=1, steps_per_epoch=args.warmup + args.steps,
                                  logger=False, callbacks=[stamps])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    # Between two batch-end stamps lie all of one step's hooks (the progress bar's included, whichever
    # order they run in), so each difference is one full Lightning step.
    return step_times(stamps.stamps, args.warmup)


def quiet_mean(times: list[float]) -> float:
    cutoff = QUIET * statistics.median(times)
    return statistics.fmean(t for t in times if t <= cutoff)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    # One thread on CPU by default: on a shared machine, oversubscribed OpenMP threads make steps up to 10x
    # slower in bursts; what is measured, the loop's Python overhead, is single-threaded anyway.
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on cpu)")
    p.add_argument("--small-input", action="store_true", help="3x3 stem without max-pool (CIFAR-style)")
    p.add_argument("--no-progress-bar", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)

    loader = make_loader((args.warmup + args.steps) * args.batch_size, args.batch_size, args.image_size, 0)
    bare: list[float] = []
    lightning: list[float] = []
    spans: dict[str, list[float]] = {"bare": [], "lightning": []}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats):
            for name, times, run in (
                ("bare", bare, lambda: bare_loop(args, loader)),
                ("lightning", lightning, lambda: lightning_loop(args, loader, Path(root))),
            ):
                t = run()
                times.extend(t)
                spans[name].append(args.steps * args.batch_size / sum(t))
            print(f"repeat {r}: wall-clock bare {spans['bare'][-1]:.1f} img/s, "
                  f"lightning {spans['lightning'][-1]:.1f} img/s", file=sys.stderr)

    bs = args.batch_size
    bare_ips, light_ips = bs / quiet_mean(bare), bs / quiet_mean(lightning)
    ratio = light_ips / bare_ips
    result = {
        "bench": "train_throughput",
        "arch": "resnet18",
        "small_input": args.small_input,
        "image_size": args.image_size,
        "batch_size": bs,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "progress_bar": not args.no_progress_bar,
        "bare_images_per_s": round(bare_ips, 1),
        "lightning_images_per_s": round(light_ips, 1),
        "ratio": round(ratio, 3),
        "target_ratio": 0.9,
        # What Lightning adds per step; on a faster device this, not the ratio above, carries over.
        "overhead_ms_per_step": round(1e3 * (quiet_mean(lightning) - quiet_mean(bare)), 2),
        "bare_median_step_ms": round(1e3 * statistics.median(bare), 2),
        "lightning_median_step_ms": round(1e3 * statistics.median(lightning), 2),
        "disturbed_steps": {
            "bare": sum(t > QUIET * statistics.median(bare) for t in bare),
            "lightning": sum(t > QUIET * statistics.median(lightning) for t in lightning),
            "of": len(bare),
        },
        "wall_clock_images_per_s": {k: [round(v, 1) for v in vals] for k, vals in spans.items()},
        "torch": torch.__version__,
        "lightning": pl.__version__,
        **git_state(),
    }
    write_json(args.out, result)
    print(
        f"bench-train: resnet18 {args.image_size}px batch {bs} on {args.device} "
        f"({torch.get_num_threads()} threads): bare {result['bare_images_per_s']} img/s, "
        f"lightning {result['lightning_images_per_s']} img/s, ratio {ratio:.3f} (target >= 0.9); "
        f"Lightning adds {result['overhead_ms_per_step']} ms/step -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
