"""Why FDRL's LSIF-chi2 pairing fails on 25Gaussians: train it as jobs/fdrl_toy.py does (shorter),
then probe the learned r and the sampling flow.

    python benchmarks/lsif_25g_probe.py --variant raw --steps 1000 --out runs/lsif_probe
    python benchmarks/lsif_25g_probe.py --variant raw --eta 0.1 --steps 1000 --out runs/lsif_probe
    python benchmarks/lsif_25g_probe.py --variant softplus --steps 1000 --out runs/lsif_probe
    python benchmarks/lsif_25g_probe.py --variant lr-kl --steps 1000 --out runs/lsif_probe

Variants: ``raw`` (the platform's LSIF: the net's output is r, unbounded), ``softplus`` (LSIF
with r = softplus(output) >= 0: the same loss and f' = 2r, r kept in its valid range), ``lr-kl``
(the LR pairing, for reference). Prints and writes OUT/<variant>-eta<eta>.json with:
* sample quality (% high quality, modes covered, KDE);
* r on data points, on the final samples, at the mode centres, and on a grid over [-2, 2]^2
  (share of the grid with r < 0, where r = q/p cannot be);
* the size of each sampling step |eta grad f'(r)| at steps 0, 10, 50, K-1 (median, 99th pct),
  against the mode spacing (0.71) and the mode width (4 sigma = 0.07).
"""

import fdrl  # noqa: F401

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.networks import build_network
from fdrl.core.priors import make_simple_prior
from fdrl.core.sampler import sample
from fdrl.core.step import make_state, train_step
from fdrl.data.toy import MODE_STD, MODES, make_toy, toy_metrics


class Softplus(nn.Module):
    """r = softplus(net(x)): LSIF's r kept non-negative."""

    def __init__(self, net):
        super().__init__()
        self.net, self.in_shape = net, net.in_shape

    def forward(self, x):
        return F.softplus(self.net(x))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("raw", "softplus", "lr-kl"), default="raw")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--flow-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode-std", type=float, default=MODE_STD,
                   help="std of each mode in data units (DGflow's recipe: 0.05 / 2 sqrt 2 = 0.0177)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    pairing = get_pairing("lr-kl" if args.variant == "lr-kl" else "lsif-chi2")
    net = build_network("mlp")
    if args.variant == "softplus":
        net = Softplus(net)
    flow = FlowSettings(args.flow_steps, 0, args.eta, 1e-2)
    prior = make_simple_prior("gaussian", (2,))
    pool = torch.from_numpy(modes_data(100_000, args.mode_std, args.seed))
    state = make_state(net, 5e-4, decay_steps=[args.steps // 2, 3 * args.steps // 4])
    for step in range(args.steps):
        m = train_step(state, pool[torch.randint(len(pool), (1024,), generator=gen)], prior, pairing,
                       flow, gen, dequant_std=0.0, ema_decay=0.998)
        if step % 200 == 0:
            print(step, {k: round(v, 3) for k, v in m.items()}, flush=True)

    ema = state.ema
    x0 = prior.sample(2000, torch.Generator().manual_seed(1))
    record = sorted({k for k in (0, 10, 50, args.flow_steps - 1, args.flow_steps) if k <= args.flow_steps})
    out = sample(ema, pairing, flow, start=x0, record=record, seed=1)
    stages = out.stages
    real = modes_data(2000, args.mode_std, 99)

    def r_of(x):
        with torch.no_grad():
            o = ema(torch.as_tensor(x, dtype=torch.float32))
            return (o.exp() if pairing.output == "log_r" else o).numpy()

    def step_sizes(x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(pairing.f_prime(ema(x)).sum(), x)
        return (args.eta * g.norm(dim=1)).numpy()

    grid = np.stack(np.meshgrid(np.linspace(-2, 2, 201), np.linspace(-2, 2, 201)), -1).reshape(-1, 2)
    r_grid, r_final = r_of(grid), r_of(out.x)
    q = lambda v: {k: float(np.quantile(v, t)) for k, t in (("p01", .01), ("median", .5), ("p99", .99))}  # noqa: E731
    report = {
        "variant": args.variant, "eta": args.eta, "steps": args.steps, "K": args.flow_steps,
        "mode_std": args.mode_std,
        "quality": quality(out.x.numpy(), args.mode_std),
        "r_data": q(r_of(real)), "r_modes": q(r_of(MODES)), "r_final_samples": q(r_final),
        "r_grid": {**q(r_grid), "share_negative": float((r_grid < 0).mean()), "min": float(r_grid.min()),
                   "argmin": grid[r_grid.argmin()].tolist()},
        "final_dist_to_nearest_mode": q(np.linalg.norm(out.x.numpy()[:, None] - MODES[None], axis=-1).min(1)),
        "step_size": {str(k): q(step_sizes(stages[k])) for k in record if k < args.flow_steps},
        "mode_spacing": float(np.linalg.norm(MODES[0] - MODES[1])), "mode_width_4sigma": 4 * MODE_STD,
        "log_r_curve": [float(v) for v in (out.log_r if out.log_r is not None else [])],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.variant}-eta{args.eta}" + ("" if args.mode_std == MODE_STD else f"-std{args.mode_std}")
    path = args.out / f"{tag}.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "log_r_curve"}, indent=1))
    _plot(grid, r_grid, out.x.numpy(), args.out / f"{tag}.png", args)


def modes_data(n, std, seed):
    """25Gaussians with a chosen mode width (``make_toy`` when std is DGflow's)."""
    if std == MODE_STD:
        return make_toy("25gaussians", n, seed)
    rng = np.random.default_rng(seed)
    return (MODES[rng.integers(0, len(MODES), n)] + std * rng.standard_normal((n, 2))).astype(np.float32)


def quality(x, std):
    """% within 4 std of the nearest mode, modes with >= 1% of samples, KDE (DGflow's width only)."""
    dist = np.linalg.norm(x[:, None] - MODES[None], axis=-1)
    good = dist.min(1) <= 4 * std
    counts = np.bincount(dist.argmin(1)[good], minlength=len(MODES))
    out = {"pct_high_quality": float(100 * good.mean()), "modes_covered": int((counts >= 0.01 * len(x)).sum())}
    if std == MODE_STD:
        out.update(toy_metrics("25gaussians", x, make_toy("25gaussians", 5000, 7)))
    return out


def _plot(grid, r_grid, samples, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    side = int(np.sqrt(len(grid)))
    values = r_grid.reshape(side, side)
    im = ax.imshow(values, extent=(-2, 2, -2, 2), origin="lower", cmap="coolwarm",
                   vmin=np.quantile(values, 0.02), vmax=np.quantile(values, 0.98))
    fig.colorbar(im, ax=ax, label="estimated r = q/p")
    ax.scatter(MODES[:, 0], MODES[:, 1], marker="+", c="k", s=40, label="modes")
    ax.scatter(samples[:, 0], samples[:, 1], s=1, c="yellow", alpha=0.6, label="samples")
    ax.set_title(f"{args.variant}, eta {args.eta}: r on [-2,2]^2"), ax.legend(loc="upper right", fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
