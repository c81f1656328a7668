"""Marking throughput (image·steps per second) against its ceiling, the bare forward + backward pass of the
same marking network on the same batch (gradient w.r.t. the input, as the optimiser needs).

    python bench/bench_marking.py [--batch-size 64 --steps 20 --device cpu]   (``make bench-marking``)

"marking loop" is :meth:`MarkingModule.predict_step` on one shard (random resized crop + flip per image and
step, loss, SGD step, L-inf projection, rounding, final quantisation and the per-image statistics);
"core" is :func:`mark_batch` alone. Each is timed ``--repeats`` times, interleaved with the ceiling, and the
best time is kept (the machine may be shared). Writes ``bench/results/bench_marking.json`` atomically.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from radmark.io import write_json
from radmark.marking.augment import draw_params
from radmark.marking.module import MarkingModule, MarkingSettings, PixelSpace, mark_batch
from radmark.models import FeatureExtractor, build_model

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--small-input", action="store_true", help="3x3 stem without max-pool (CIFAR-style)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_marking.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    phi = FeatureExtractor(build_model(args.arch, 10, small_input=args.small_input), arch=args.arch)
    phi = phi.to(device).eval()
    for q in phi.parameters():
        q.requires_grad_(False)
    b, s, n = args.batch_size, args.image_size, args.steps
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device)
    carriers = torch.nn.functional.normalize(torch.randn(b, phi.dim, device=device), dim=1)
    mean, std = [0.286] * 3, [0.353] * 3
    space = PixelSpace(mean, std, device)
    settings = MarkingSettings(steps=n, batch_size=b)  # the paper's recipe otherwise (SGD lr 1, R 10, ...)
    module = MarkingModule(phi, settings, mean, std, marking_seed=0).to(device)
    shard = {"shard": 0, "images": images, "labels": torch.zeros(b, dtype=torch.int64),
             "indices": torch.arange(b), "carriers": carriers}
    params = draw_params(torch.Generator().manual_seed(0), n, b)

    def ceiling() -> None:
        x = space.normalize_u8(images).requires_grad_(True)
        for _ in range(n):
            x.grad = None
            phi(x).sum().backward()

    def loop() -> None:
        module.predict_step(shard, 0)

    def core() -> None:
        mark_batch(phi, images, carriers, params, settings, space)

    ceiling(), loop(), core()  # warm-up (allocator, oneDNN / cuDNN kernel choice)
    times: dict[str, list[float]] = {"ceiling": [], "loop": [], "core": []}
    for _ in range(args.repeats):
        for name, fn in (("ceiling", ceiling), ("loop", loop), ("core", core)):
            times[name].append(timed(fn, device))
    best = {k: min(v) for k, v in times.items()}
    rate = {k: b * n / t for k, t in best.items()}
    result = {
        "config": {**vars(args), "out": str(args.out), "threads": torch.get_num_threads()},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "image_steps_per_s": {k: round(v, 1) for k, v in rate.items()},
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "ratio_loop": round(rate["loop"] / rate["ceiling"], 3),
        "ratio_core": round(rate["core"] / rate["ceiling"], 3),
        "target_ratio": 0.8,
    }
    write_json(args.out, result)
    print(
        f"marking loop {rate['loop']:.0f} image·steps/s, core {rate['core']:.0f}, bare forward+backward "
        f"{rate['ceiling']:.0f} ({args.arch}, batch {b}, {s}px, {n} steps, {result['device']}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(f"ratio marking/ceiling: loop {result['ratio_loop']:.3f}, core {result['ratio_core']:.3f} "
          f"(target >= 0.8) -> {args.out}")


if __name__ == "__main__":
    main()
