"""Prototype (issue 7): per-image secret noise twins, the mark as far from its twin as the budget allows.

Each marked private image i gets its own secret pattern P_i (max |P_i| = 1) and a secret fair coin s_i; the
released copy is round(x_i + s_i * R * P_i) and the owner keeps the twin round(x_i - s_i * R * P_i), both
clipped to [0, 255]. The two copies are 2R apart at every pixel where the pattern is +-1 (R = 10: L-inf
10/255, PSNR about 28 dB for `sign`), against about R apart for twins marked toward two independent
feature-space carriers. The victim is trained as in `+experiment=power` (radmark.victim.train_victim); the
test is radmark's black-box twin sign test (loss averaged over 8 crop + flip views,
radmark.detection.blackbox), exact under H0 because the coins are secret.

Pattern kinds: `sign` = iid +-1 per pixel (shared by the 3 channels: the images are grey); `lf` = random
low-frequency pattern (the 18-d DCT subspace of pixel_carriers.py), normalised to max 1.

`h0=1` trains the victim on the unmarked originals instead (H0 true): the same twins, tested the same way,
as a check of the null.

Run from the repository root (results go to experiments/power/noise_runs/<tag>/result.json):
    python experiments/power/noise_twins.py tag=sign10_e100 kind=sign q=0.1 epochs=100
    python experiments/power/noise_twins.py --table   # writes experiments/results/noise_twins.md
"""

from __future__ import annotations

import time

import torch
from common import ROOT, ReleasedSplit, command, main, pixel_budget, power_config, save_result, write_table
from pixel_carriers import LF_BASIS, lf_pattern

RUNS = ROOT / "experiments" / "power" / "noise_runs"
S = 32


def patterns(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """(n, S, S) secret per-image patterns with max |P| = 1."""
    if kind == "sign":
        return torch.randint(0, 2, (n, S, S), generator=g).float() * 2 - 1
    if kind == "lf":
        coef = torch.randn(n, LF_BASIS.shape[0], generator=g)
        return torch.stack([lf_pattern(c / c.norm()) for c in coef])
    raise ValueError(f"kind={kind}: use sign or lf")


def run(args: dict[str, str]) -> dict:
    from radmark.config import resolve_seeds
    from radmark.detection.blackbox import apply_view, cross_entropy_tail_exact, draw_views, sign_test
    from radmark.pipeline import make_datamodule
    from radmark.victim.train import train_victim

    q, epochs, R, kind = float(args.get("q", 0.1)), int(args.get("epochs", 100)), float(args.get("R", 10)), \
        args.get("kind", "sign")
    out = RUNS / args["tag"]
    out.mkdir(parents=True, exist_ok=True)
    cfg = power_config(out, [f"victim.epochs={epochs}", f"marking.fraction={q}"])
    dm = make_datamodule(cfg, resolve_seeds(cfg.seeds))
    private = dm.dataset("private")
    X = torch.stack([private[i][0] for i in range(len(private))]).float()
    Y = torch.as_tensor(private.labels)
    n, m = len(X), int(round(q * len(X)))
    g_key = torch.Generator().manual_seed(4321)  # the owner's secret: marked subset, patterns, coins
    marked = torch.randperm(n, generator=g_key)[:m]
    P = patterns(kind, m, g_key)[:, None]  # (m, 1, S, S), broadcast over channels
    coins = (torch.randint(0, 2, (m,), generator=g_key).float() * 2 - 1)[:, None, None, None]
    released = (X[marked] + coins * R * P).round().clamp(0, 255)
    twins = (X[marked] - coins * R * P).round().clamp(0, 255)
    Xr = X.clone()
    if args.get("h0", "0") != "1":  # h0=1: the victim trains on the unmarked originals (H0 holds)
        Xr[marked] = released
    psnr, linf = pixel_budget(X[marked], released)
    start = time.perf_counter()
    victim = train_victim(cfg, dm, ReleasedSplit(Xr, Y), out)
    model = victim.model.eval()
    result = {"tag": args["tag"], "args": args, "command": command("noise_twins.py", args),
              "psnr_mean": psnr, "linf_max": linf, "n_marked": m, "victim_seconds": time.perf_counter() - start,
              "test_acc": victim.metrics["victim/test_acc"], "train_acc": victim.metrics["victim/train_acc"]}
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)
    views = draw_views(8, 0)
    assert views is not None
    y = Y[marked]

    def loss(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([cross_entropy_tail_exact(model((apply_view(x, u) / 255 - mean) / std), y)
                                for u in views]).mean(0)

    test = sign_test(loss(released).numpy(), loss(twins).numpy())
    result.update(wins=test["wins"], n_pairs=test["n"], blackbox_log10_p=test["log10_p"])
    save_result(out, result)
    return result


def table() -> None:
    header = [
        "# Per-image noise twins (prototype, issue 7)",
        "",
        "Made by `python experiments/power/noise_twins.py --table` from `experiments/power/noise_runs/*/result.json`;",
        "the design is the docstring of `experiments/power/noise_twins.py`. Setting: `+experiment=power`",
        "(Fashion-MNIST 32 px, 1,500 private images, ResNet-18 victim with the ImageNet stem, crop + flip).",
        "",
        "| tag | pattern | marked | R | victim trained on | victim epochs | train / test acc % | PSNR dB | L∞ | twin wins / pairs "
        "| black-box log10 p | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(r: dict) -> str:
        a = r["args"]
        return (
            f"| {r['tag']} | {a.get('kind', 'sign')} | {float(a.get('q', 0.1)):.0%} | {a.get('R', '10')} "
            f"| {'originals (H0)' if a.get('h0') == '1' else 'released'} | {a.get('epochs', '100')} | {100 * r['train_acc']:.1f} / {100 * r['test_acc']:.1f} "
            f"| {r['psnr_mean']:.1f} | {r['linf_max']:.0f} | {r['wins']} / {r['n_pairs']} "
            f"| {r['blackbox_log10_p']:.2f} | `{r['command']}` |")

    write_table(RUNS, "noise_twins", header, row)


if __name__ == "__main__":
    main(run, table)
