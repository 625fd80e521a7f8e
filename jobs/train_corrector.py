"""Train a density-ratio corrector d_lambda for a registered generator (DGflow section 3) and
register it as a new version of that generator's model (alias ``candidate``).

    # VAE refined with a GAN's discriminator: d_lambda starts from d_phi of --reference and learns
    # to separate the GAN's samples (class 1) from the VAE's; the ratio is exp(-d_phi) exp(-d_lambda)
    python jobs/train_corrector.py --generator models:/vae-mnist@candidate --reference models:/gan-mnist@candidate
    # a WGAN critic (not a calibrated logit): d_lambda calibrates it, d + d_lambda separates data
    # from the generator's samples; a model without a discriminator gets a fresh d_lambda
    python jobs/train_corrector.py --generator models:/gan-25gaussians@candidate --iters 2000

SGD lr 1e-4, momentum 0.9, batch 64 (the paper's), --iters iterations (paper 10k).
"""

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import json
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="models:/NAME@ALIAS of the generator to correct")
    p.add_argument("--reference", default=None, help="models:/NAME@ALIAS of a GAN whose d_phi to reuse")
    p.add_argument("--iters", type=int, default=10_000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--experiment", default="fdrl-generators")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)

    from fdrl.workflows.generators import train_corrector

    try:
        out = train_corrector(args.generator, args.reference, iters=args.iters, lr=args.lr,
                              momentum=args.momentum, batch=args.batch, seed=args.seed,
                              log_every=args.log_every, experiment=args.experiment,
                              tracking_uri=args.tracking_uri)
    except (ValueError, LookupError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
