"""Refine samples: DGflow with a registered generator's discriminator, or with an FDRL ratio model.

DGflow (``--generator``): a registered GAN/VAE/flow (jobs/train_gan.py, jobs/train_corrector.py),
refined with its discriminator (plus corrector) as the ratio exp(-d):

    python jobs/refine.py --generator models:/gan-25gaussians@candidate --space data --f kl \
        --n 5000 --seed 0 --out runs/refined
    python jobs/refine.py --generator models:/gan-mnist@candidate --space latent --steps 25 --out runs/r
    python jobs/refine.py --generator models:/gan-swissroll@candidate --method dot --out runs/dot

``--method dgflow|dot|ddls``, ``--f kl|js|logd``, ``--space latent|data``, ``--eta --gamma
--steps N|auto``; defaults are the paper's (REFERENCE.md). Writes DIR/base.npy (unrefined, same
latents) and DIR/samples.npy (refined), in data units, DIR/before_after.png (2D scatter or image
grid), DIR/curve.json and curve.png (mean log-ratio estimate, -d, at every step), DIR/metrics.json
(2D: % high quality, modes, KDE; images: domain FD/KID against --data or MNIST-5k), and logs a
refinement run to MLflow linked to the model version. Chunks are seeded per (seed, chunk index),
so ``--workers`` never changes the arrays. ``--input samples.npy`` refines given samples in data
space with the generator model's discriminator.

FDRL (``--model``): push ``--input`` samples along a registered FDRL ratio model,
x <- x - eta grad f'(r(x)) + sqrt(2 eta gamma) xi; writes DIR/refined.npy, before_after.png,
kl.json and kl.png.

    python jobs/refine.py --model models:/fdrl-mnist@candidate --input runs/s/samples.npy --steps 25
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
    p.add_argument("--model", default=None, help="models:/NAME@ALIAS of an FDRL ratio model")
    p.add_argument("--generator", default=None,
                   help="models:/NAME@ALIAS of a registered generator (DGflow with its discriminator)")
    p.add_argument("--input", default=None, help="samples.npy (or, with --model, models:/NAME@ALIAS)")
    p.add_argument("--steps", default=None,
                   help="refinement steps, or 'auto' (DGflow: stop when the mean log-ratio stops "
                        "improving by --tol). Default: FDRL 25; DGflow the paper's for the method")
    p.add_argument("--method", choices=("dgflow", "dot", "ddls"), default="dgflow")
    p.add_argument("--f", default="kl", help="f-divergence of DGflow: kl, js or logd")
    p.add_argument("--space", default=None, help="latent or data (default: data for 2D, latent for images)")
    p.add_argument("--tol", type=float, default=1e-3, help="--steps auto: improvement over 5 steps")
    p.add_argument("--max-steps", type=int, default=500, help="--steps auto: the pilot's step limit")
    p.add_argument("--no-corrector", action="store_true", help="ignore a registered corrector")
    p.add_argument("--workers", type=int, default=0, help="Ray workers (0: this process)")
    p.add_argument("--eta", type=float, default=None, help="step size (default: the model's eta)")
    p.add_argument("--gamma", type=float, default=None,
                   help="noise: nu = sqrt(2 eta gamma); 0: deterministic. Default: nu^2 / (2 eta) of the "
                        "model, i.e. its own flow noise (DGflow's 0.01 is for latent space, eta 0.1)")
    p.add_argument("--n", type=int, default=None, help="refine the first N samples (default: all, 256 from a model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default=None,
                   help="DGflow on images: labelled real shards for domain FD/KID before and after "
                        "(default: the MNIST-5k shards for a generator trained on mnist)")
    p.add_argument("--classifier", default=None,
                   help="DGflow on images: feature classifier, folder or models:/NAME@ALIAS "
                        "(default: the one jobs/evaluate.py trains once per dataset)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="fdrl-refine")
    args = p.parse_args(argv)
    if (args.model is None) == (args.generator is None):
        p.error("give exactly one of --model (FDRL ratio) and --generator (DGflow)")
    if args.generator:
        from fdrl.distributed.refine_job import dgflow_main

        return dgflow_main(args)
    if args.input is None:
        p.error("--model needs --input")
    try:
        args.steps = 25 if args.steps is None else int(args.steps)
    except ValueError:
        p.error(f"--steps auto is for DGflow (--generator); got --steps {args.steps}")

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
