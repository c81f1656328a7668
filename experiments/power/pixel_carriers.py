"""Prototype (issue 7): class carriers drawn in pixel space instead of the marking network's feature space.

Each class k gets a secret pattern P_k (max |P_k| = 1); a marked image of class k is round(x + R * P_k)
clipped to [0, 255]. The victim is trained exactly as in `+experiment=power` (radmark.victim.train_victim),
then three tests, all with exact nulls because the secret patterns are independent of any model that never
saw the data:

- white-box (kind=lf only): cosine between the victim's mean input gradient of log p(k) over held-out images,
  projected on the pattern subspace, and the secret coefficient vector; beta null in the subspace dimension,
  Fisher over classes;
- black-box, in distribution: mean change of log p(k) when R * P_k is added to held-out images, ranked among
  the same change for M fresh patterns drawn for class k alone (p_k = (1 + #fresh >= secret) / (M + 1)), Fisher
  over classes (valid: the per-class ranks are independent and super-uniform under H0);
- black-box, out of distribution: the same rank test on a blank image (black, or grey 128) plus the pattern
  at amplitude 10, 30 or 80.

Pattern kinds: `lf` = flip-symmetric low-frequency DCT patterns (ky < 6, even kx < 6: an 18-d subspace);
`tex` = sums of 4 gratings with 5-10 cycles per image, random orientation and phase.
Optional: sel=hard (mark the images the marking network is least sure of), adv=EPS (first push the marked images
away from their class with 10 PGD steps on the marking network, L-inf EPS, before adding the pattern).

Run from the repository root (results go to experiments/power/pixel_runs/<tag>/result.json):
    python experiments/power/pixel_carriers.py tag=lf10 kind=lf q=0.1 epochs=30
    python experiments/power/pixel_carriers.py --table   # writes experiments/results/pixel_carriers.md
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from common import ROOT, ReleasedSplit, command, main, pixel_budget, power_config, save_result, write_table

RUNS = ROOT / "experiments" / "power" / "pixel_runs"
S, C = 32, 10


def dct1(n_px: int, k: int) -> torch.Tensor:
    n = torch.arange(n_px, dtype=torch.float64)
    v = torch.cos(math.pi * (2 * n + 1) * k / (2 * n_px))
    return v / v.norm()


LF_BASIS = torch.stack([torch.outer(dct1(S, ky), dct1(S, 2 * kx)) for ky in range(6) for kx in range(3)]).float()
YY, XX = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")


def lf_pattern(coef: torch.Tensor) -> torch.Tensor:
    p = torch.einsum("d,dhw->hw", coef, LF_BASIS)
    return p / p.abs().max()


def tex_pattern(g: torch.Generator, n_comp: int = 4) -> torch.Tensor:
    p = torch.zeros(S, S)
    for _ in range(n_comp):
        r = 5 + 5 * torch.rand(1, generator=g).item()
        th = math.pi * torch.rand(1, generator=g).item()
        ph = 2 * math.pi * torch.rand(1, generator=g).item()
        p += torch.cos(2 * math.pi * r / S * (math.cos(th) * XX + math.sin(th) * YY) + ph)
    return p / p.abs().max()


def draw(kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pattern and, for `lf`, its unit coefficient vector (the white-box test's secret direction)."""
    if kind == "lf":
        a = torch.randn(LF_BASIS.shape[0], generator=g)
        a = a / a.norm()
        return lf_pattern(a), a
    return tex_pattern(g), None


def run(args: dict[str, str]) -> dict:
    from radmark.config import resolve_seeds
    from radmark.data.transforms import normalize
    from radmark.detection.stats import cosine_null_logsf, fisher_log_p, to_log10
    from radmark.pipeline import make_datamodule
    from radmark.victim.train import train_victim

    q, epochs, R = float(args.get("q", 0.1)), int(args.get("epochs", 30)), float(args.get("R", 10))
    kind, sel, eps, M = args.get("kind", "lf"), args.get("sel", "uniform"), float(args.get("adv", 0)), 63
    bs = int(args.get("bs", 128))
    out = RUNS / args["tag"]
    out.mkdir(parents=True, exist_ok=True)
    cfg = power_config(out, [f"victim.epochs={epochs}", f"victim.batch_size={bs}", f"marking.fraction={q}"])
    seeds = resolve_seeds(cfg.seeds)
    dm = make_datamodule(cfg, seeds)
    mean, std = list(dm.mean), list(dm.std)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return normalize(x / 255.0, mean, std)

    private = dm.dataset("private")
    X = torch.stack([private[i][0] for i in range(len(private))]).float()
    Y = torch.as_tensor(private.labels)
    g_key = torch.Generator().manual_seed(1234)
    secret = [draw(kind, g_key) for _ in range(C)]
    P = torch.stack([p for p, _ in secret])

    n, m = len(X), int(round(q * len(X)))
    if sel == "hard" or eps > 0:
        from radmark.marking.api import _true_class_confidence
        from radmark.marking.network import get_marking_network

        net, _ = get_marking_network(cfg, dm)
        net.eval()
    if sel == "hard":
        marked = torch.argsort(torch.as_tensor(_true_class_confidence(cfg, dm, net)))[:m]
    else:
        marked = torch.randperm(n, generator=torch.Generator().manual_seed(99))[:m]
    Xm = X.clone()
    if eps > 0:  # harden: 10 signed-gradient steps up the marking net's loss, inside L-inf eps
        xs, ys = X[marked], Y[marked]
        delta = torch.zeros_like(xs)
        for _ in range(10):
            delta.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(net(prep((xs + delta).clamp(0, 255))), ys)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + 2.0 * grad.sign()).clamp(-eps, eps)
        Xm[marked] = (xs + delta).clamp(0, 255)
    for i in marked.tolist():
        Xm[i] = (Xm[i] + R * P[Y[i]]).round().clamp(0, 255)
    psnr, linf = pixel_budget(X[marked], Xm[marked])
    start = time.perf_counter()
    victim = train_victim(cfg, dm, ReleasedSplit(Xm, Y), out)
    model = victim.model.eval()
    result = {"tag": args["tag"], "args": args, "command": command("pixel_carriers.py", args),
              "psnr_mean": psnr, "linf_max": linf, "n_marked": m, "victim_seconds": time.perf_counter() - start,
              "test_acc": victim.metrics["victim/test_acc"], "train_acc": victim.metrics["victim/train_acc"]}

    heldout = dm.dataset("heldout")
    H = torch.stack([heldout[i][0] for i in range(500)]).float()
    if kind == "lf":
        Hr = H.clone().requires_grad_(True)
        logp = torch.log_softmax(model(prep(Hr)), dim=1)
        cos = []
        for k in range(C):
            (gk,) = torch.autograd.grad(logp[:, k].sum(), Hr, retain_graph=True)
            coef = torch.einsum("hw,dhw->d", gk.sum(dim=(0, 1)).double(), LF_BASIS.double()).float()
            cos.append(float(coef @ secret[k][1] / coef.norm()))
        result["whitebox_cos"] = cos
        result["whitebox_log10_p"] = to_log10(fisher_log_p(cosine_null_logsf(np.array(cos), LF_BASIS.shape[0])))

    fresh = []
    for k in range(C):  # an independent pool of fresh patterns per class keeps the per-class ranks independent
        g = torch.Generator().manual_seed(7_000 + k)
        fresh.append(torch.stack([draw(kind, g)[0] for _ in range(M)]))

    def rank_test(response) -> tuple[float, list[float]]:
        ps = []
        for k in range(C):
            s = response(P[k], k)
            f = np.array([response(v, k) for v in fresh[k]])
            ps.append(float((1 + (f >= s).sum()) / (M + 1)))
        return to_log10(fisher_log_p(np.log(ps))), ps

    with torch.no_grad():
        Hb = H[:200]
        base = torch.log_softmax(model(prep(Hb)), 1)

        def in_dist(p: torch.Tensor, k: int) -> float:
            x = (Hb + R * p).round().clamp(0, 255)
            return float((torch.log_softmax(model(prep(x)), 1) - base)[:, k].mean())

        result["blackbox_log10_p"], result["blackbox_p"] = rank_test(in_dist)
        result["ood"] = {}
        for amp in (10, 30, 80):
            for bg in (0.0, 128.0):
                def ood(p: torch.Tensor, k: int, amp=amp, bg=bg) -> float:
                    x = (bg + amp * p).clamp(0, 255).round().expand(3, S, S)[None]
                    return float(torch.softmax(model(prep(x)), 1)[0, k])

                result["ood"][f"amp{amp}_bg{int(bg)}"] = rank_test(ood)[0]
    save_result(out, result)
    return result


def table() -> None:
    header = [
        "# Pixel-space class carriers (prototype, issue 7)",
        "",
        "Made by `python experiments/power/pixel_carriers.py --table` from `experiments/power/pixel_runs/*/result.json`;",
        "what each test is: the docstring of `experiments/power/pixel_carriers.py`. Setting: `+experiment=power`",
        "(Fashion-MNIST 32 px, 1,500 private images, ResNet-18 victim with the ImageNet stem, crop + flip),",
        "M = 63 fresh patterns per class for the rank tests (smallest possible log10 p: about −14). \"Best OOD\" is",
        "the smallest of the six out-of-distribution query settings, not corrected for that choice.",
        "",
        "| tag | pattern | marked | R | hardening | epochs / batch | train / test acc % | PSNR dB | L∞ | white-box log10 p "
        "| black-box log10 p (in dist.) | best OOD log10 p | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(r: dict) -> str:
        a = r["args"]
        wb = r.get("whitebox_log10_p")
        return (
            f"| {r['tag']} | {a.get('kind', 'lf')} | {float(a.get('q', 0.1)):.0%} {a.get('sel', 'uniform')} "
            f"| {a.get('R', '10')} | {'PGD ' + a['adv'] if 'adv' in a else '—'} "
            f"| {a.get('epochs', '30')} / {a.get('bs', '128')} | {100 * r['train_acc']:.1f} / {100 * r['test_acc']:.1f} "
            f"| {r['psnr_mean']:.1f} | {r['linf_max']:.0f} | {'—' if wb is None else f'{wb:.2f}'} "
            f"| {r['blackbox_log10_p']:.2f} | {min(r['ood'].values()):.2f} | `{r['command']}` |")

    write_table(RUNS, "pixel_carriers", header, row)


if __name__ == "__main__":
    main(run, table)
