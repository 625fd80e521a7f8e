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
    p.add_argument("--out", required=True, help="output folder (a local path or an s3:// or gs:// URI)")
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
    from fdrl.workflows.refine import refine_generator, refine_with_ratio

    try:
        if args.generator:
            summary = refine_generator(
                args.generator, args.out, method=args.method, f=args.f, space=args.space,
                steps=args.steps, eta=args.eta, gamma=args.gamma, n=args.n, seed=args.seed,
                workers=args.workers, input=args.input, no_corrector=args.no_corrector,
                tol=args.tol, max_steps=args.max_steps, data=args.data, classifier=args.classifier,
                tracking_uri=args.tracking_uri, experiment=args.experiment)
            print(json.dumps({k: summary[k] for k in ("before", "after", "steps", "n")}))
            print(f"refined {summary['n']} samples ({summary['steps']} steps) -> {summary['samples']}, "
                  f"base {summary['base']}")
            return 0
        if args.input is None:
            p.error("--model needs --input")
        if args.steps is not None and not args.steps.isdigit():
            p.error(f"--steps auto is for DGflow (--generator); got --steps {args.steps}")
        summary = refine_with_ratio(args.model, args.input, args.out,
                                    steps=25 if args.steps is None else int(args.steps),
                                    eta=args.eta, gamma=args.gamma, n=args.n, seed=args.seed,
                                    tracking_uri=args.tracking_uri, experiment=args.experiment)
    except (FileNotFoundError, ValueError, LookupError) as err:
        sys.exit(f"error: {err}")
    for step, value in enumerate(summary["mean_log_r"]):
        print(f"step {step:3d}  mean log r {value:+.4f}")
    print(f"refined {summary['n']} samples -> {summary['refined']}, {args.out}/before_after.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
