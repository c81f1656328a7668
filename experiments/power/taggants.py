"""Prototype (issue 7): a Data-Taggants-style key-based black-box baseline (Bouaziz et al., ICLR 2025), from
the paper's description.

The owner draws n_keys secret key images (held-out images, never released) and, for each, a secret label
uniform over the C classes. The marked images (a fraction q of the private split, drawn among the classes of
the secret labels) are perturbed within L-inf R/255 so that the surrogate's training gradient on them (true
labels) points the same way as its gradient on the keys with their secret labels (gradient matching: 1 - cos
over all parameters, differentiable random crop + flip, Adam on the perturbation, projection each step).
The surrogate is the owner's marking network (trained on the public split).

Test: the suspect's top-k predictions on the keys. Under H0 the secret labels are uniform and independent of
the model, so each key is a hit with probability exactly k/C, independently: hits ~ Binomial(n_keys, k/C).

Run from the repository root (results go to experiments/power/taggants_runs/<tag>/result.json):
    python experiments/power/taggants.py tag=tg10 q=0.1
    python experiments/power/taggants.py --table   # writes experiments/results/taggants.md
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from common import ROOT, ReleasedSplit, command, main, pixel_budget, power_config, save_result, write_table
from scipy import stats

RUNS = ROOT / "experiments" / "power" / "taggants_runs"


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([g.reshape(-1) for g in grads])


def run(args: dict[str, str]) -> dict:
    import copy

    from radmark.config import resolve_seeds
    from radmark.data.transforms import normalize
    from radmark.marking.augment import draw_params, random_resized_crop
    from radmark.marking.network import get_marking_network
    from radmark.pipeline import make_datamodule
    from radmark.victim.train import train_victim

    q, R, steps = float(args.get("q", 0.1)), float(args.get("R", 10)), int(args.get("steps", 60))
    n_keys, epochs, C = int(args.get("keys", 10)), int(args.get("epochs", 10)), 10
    out = RUNS / args["tag"]
    out.mkdir(parents=True, exist_ok=True)
    cfg = power_config(out, [f"victim.epochs={epochs}", f"marking.fraction={q}"])
    seeds = resolve_seeds(cfg.seeds)
    dm = make_datamodule(cfg, seeds)
    mean, std = list(dm.mean), list(dm.std)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return normalize(x / 255.0, mean, std)

    g = torch.Generator().manual_seed(int(args.get("seed", 2024)))
    heldout = dm.dataset("heldout")
    key_idx = torch.randperm(len(heldout), generator=g)[:n_keys]
    keys = torch.stack([heldout[int(i)][0] for i in key_idx]).float()
    key_labels = torch.randint(0, C, (n_keys,), generator=g)

    private = dm.dataset("private")
    X = torch.stack([private[i][0] for i in range(len(private))]).float()
    Y = torch.as_tensor(private.labels)
    m = int(round(q * len(X)))
    eligible = torch.nonzero(torch.isin(Y, key_labels)).flatten()
    marked = eligible[torch.randperm(len(eligible), generator=g)[:m]]

    net, _ = get_marking_network(cfg, dm)
    surrogate = copy.deepcopy(net).eval()
    params = [p.requires_grad_(True) for p in surrogate.parameters()]
    views = 4
    u_key = draw_params(g, views, n_keys)
    target = sum(flat_grad(F.cross_entropy(surrogate(prep(random_resized_crop(keys, u_key[v], 0.7))),
                                           key_labels), params, False) for v in range(views)) / views
    target = target.detach()
    xs, ys = X[marked], Y[marked]
    delta = torch.zeros_like(xs, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=float(args.get("lr", 1.0)))
    u = draw_params(g, steps, m)
    start = time.perf_counter()
    for step in range(steps):
        xa = random_resized_crop((xs + delta).clamp(0, 255), u[step], 0.7)
        grad = flat_grad(F.cross_entropy(surrogate(prep(xa)), ys), params, True)
        loss = 1 - F.cosine_similarity(grad, target, dim=0)
        opt.zero_grad()
        loss.backward()
        delta.grad.sign_()  # signed Adam, as in gradient-matching poisoning
        opt.step()
        with torch.no_grad():
            delta.clamp_(-R, R)
            delta.copy_((xs + delta).clamp(0, 255) - xs)
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step} alignment loss {loss.item():.3f}", flush=True)
    craft_seconds = time.perf_counter() - start
    Xm = X.clone()
    Xm[marked] = (xs + delta.detach()).round().clamp(0, 255)
    psnr, linf = pixel_budget(X[marked], Xm[marked])
    victim = train_victim(cfg, dm, ReleasedSplit(Xm, Y), out)
    model = victim.model.eval()
    with torch.no_grad():
        logits = model(prep(keys))
        surrogate_logits = surrogate(prep(keys))
    result = {"tag": args["tag"], "args": args, "command": command("taggants.py", args),
              "n_marked": m, "psnr_mean": psnr, "linf_max": linf,
              "craft_seconds": craft_seconds, "final_alignment_loss": loss.item(),
              "test_acc": victim.metrics["victim/test_acc"], "train_acc": victim.metrics["victim/train_acc"]}
    for k in (1, 3):
        hits = int((logits.topk(k, 1).indices == key_labels[:, None]).any(1).sum())
        result[f"top{k}_hits"] = hits
        result[f"top{k}_log10_p"] = float(stats.binom.logsf(hits - 1, n_keys, k / C) / np.log(10))
        result[f"surrogate_top{k}_hits"] = int(
            (surrogate_logits.topk(k, 1).indices == key_labels[:, None]).any(1).sum())
    save_result(out, result)
    return result


def table() -> None:
    header = [
        "# Data-Taggants-style key-based baseline (prototype, issue 7)",
        "",
        "Made by `python experiments/power/taggants.py --table` from `experiments/power/taggants_runs/*/result.json`;",
        "the method and its exact binomial null: the docstring of `experiments/power/taggants.py`. Setting:",
        "`+experiment=power` (Fashion-MNIST 32 px, 1,500 private images, ResNet-18 victim, crop + flip).",
        "",
        "| tag | marked | keys | R | crafting steps | last-step alignment loss (1 − cos) | victim epochs | train / test acc % | PSNR dB "
        "| top-1 hits (log10 p) | top-3 hits (log10 p) | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(r: dict) -> str:
        a = r["args"]
        return (
            f"| {r['tag']} | {r['n_marked']} ({float(a.get('q', 0.1)):.0%}) | {a.get('keys', '10')} | {a.get('R', '10')} "
            f"| {a.get('steps', '60')} | {r['final_alignment_loss']:.2f} | {a.get('epochs', '10')} "
            f"| {100 * r['train_acc']:.1f} / {100 * r['test_acc']:.1f} | {r['psnr_mean']:.1f} "
            f"| {r['top1_hits']} ({r['top1_log10_p']:.2f}) | {r['top3_hits']} ({r['top3_log10_p']:.2f}) "
            f"| `{r['command']}` |")

    write_table(RUNS, "taggants", header, row)


if __name__ == "__main__":
    main(run, table)
