"""Refine samples with a registered FDRL ratio model (DGflow-style):
x <- x - eta grad f'(r(x)) + sqrt(2 eta gamma) xi for --steps steps.

    python jobs/refine.py --model models:/fdrl-mnist@candidate --input runs/s/samples.npy --steps 25

Writes DIR/refined.npy, DIR/before_after.png (odd rows before, even rows after), DIR/kl.json and
DIR/kl.png (the KL diagnostic, mean log r, at every step), and logs them to an MLflow run.
"""


import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS of the FDRL ratio model")
    p.add_argument("--input", required=True, help="samples.npy or models:/NAME@ALIAS of a generator")
    p.add_argument("--steps", type=int, default=25, help="refinement steps (kappa)")
    p.add_argument("--eta", type=float, default=None, help="step size (default: the model's eta)")
    p.add_argument("--gamma", type=float, default=None,
                   help="noise: nu = sqrt(2 eta gamma); 0: deterministic. Default: nu^2 / (2 eta) of the "
                        "model, i.e. its own flow noise (DGflow's 0.01 is for latent space, eta 0.1)")
    p.add_argument("--n", type=int, default=None, help="refine the first N samples (default: all, 256 from a model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="fdrl-refine")
    args = p.parse_args(argv)

    from fdrl.data.images import save_grid
    from fdrl.core.refine import refine
    from fdrl.distributed.sampling import load_samples
    from fdrl.tracking.registry import load_fdrl_model
    from fdrl.tracking.tracker import Tracker

    try:
        model = load_fdrl_model(args.model, args.tracking_uri)
        before = torch.from_numpy(load_samples(args.input, args.n, args.seed, args.tracking_uri)).float()
        eta = args.eta if args.eta is not None else model.config.eta
        gamma = args.gamma if args.gamma is not None else model.config.nu ** 2 / (2 * eta)
        after, kl = refine(model.net, model.pairing, before, args.steps, eta, gamma, args.seed)
    except (FileNotFoundError, ValueError, LookupError) as err:
        sys.exit(f"error: {err}")

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "refined.npy", after.numpy())
    cols = 8
    pairs = min(len(before) // cols, 4) or 1
    rows = [t for i in range(pairs) for t in (before[i * cols:(i + 1) * cols], after[i * cols:(i + 1) * cols])]
    save_grid(torch.cat(rows), args.out / "before_after.png", nrow=cols)
    curve = kl.tolist()
    (args.out / "kl.json").write_text(json.dumps({"mean_log_r": curve, "eta": eta, "gamma": gamma}))
    _plot(curve, args.out / "kl.png")
    for step, value in enumerate(curve):
        print(f"step {step:3d}  mean log r {value:+.4f}")

    with Tracker(args.experiment, run_name=f"refine-{model.name}-v{model.version}",
                 tracking_uri=args.tracking_uri,
                 tags={"model_uri": args.model, "model_version": model.version, "input": args.input}) as t:
        t.log_params({"steps": args.steps, "eta": eta, "gamma": gamma, "n": len(before)})
        for step, value in enumerate(curve):
            t.log_metrics({"kl_diagnostic": value}, step)
        for name in ("before_after.png", "kl.png", "kl.json"):
            t.log_artifact(args.out / name)
    print(f"refined {len(before)} samples -> {args.out}/refined.npy, {args.out}/before_after.png")


def _plot(curve, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(len(curve)), curve, marker=".")
    ax.set_xlabel("refinement step"), ax.set_ylabel("mean log r (KL diagnostic)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
