"""Fit the data-dependent Gaussian prior of a shard directory with Ray tasks.

Each task streams a group of shards into mergeable statistics; the driver merges them and
factors the covariance. "full" keeps the whole covariance factor (3*H*W squared floats: fine up
to 64x64), "lowrank" keeps the top --rank principal components plus an isotropic residual.

    python datasets/fit_prior.py data/mnist --kind full --out runs/priors/mnist-full.safetensors
    python datasets/fit_prior.py /shared/church --kind lowrank --rank 512 --out /shared/church-prior.safetensors

Starts a local Ray, or connects to a running cluster when RAY_ADDRESS is set (or under
`ray job submit`). Pass the file to training with --prior-path.
"""

from __future__ import annotations


import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA", help="shard directory with manifest.parquet")
    parser.add_argument("--kind", choices=["full", "lowrank"], default="full",
                        help="covariance form (default: full)")
    parser.add_argument("--rank", type=int, default=512, metavar="N",
                        help="principal components of the lowrank prior (default: 512)")
    parser.add_argument("--tasks", type=int, default=0, metavar="N",
                        help="Ray tasks (default: one per available CPU, at most one per shard)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sketch (lowrank above 64x64x3)")
    parser.add_argument("--out", required=True, metavar="PRIOR.safetensors", help="output file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fdrl.data.manifest import open_shard_set

    try:
        shard_set = open_shard_set(args.data)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    from fdrl.data import storage
    from fdrl.workflows.priors import fit_prior_distributed, save_prior

    # On RAY_ADDRESS's cluster, or the cluster of a `ray job submit`, else a local Ray.
    try:
        prior, seconds = fit_prior_distributed(shard_set, args.kind, rank=args.rank,
                                               tasks=args.tasks, seed=args.seed)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = storage.resolve(args.out)
    save_prior(prior, out)
    print(f"fitted {args.kind} Gaussian prior on {prior.count} images of shape "
          f"{shard_set.shape} from {len(shard_set.shards)} shards in {seconds:.1f} s")
    print(f"wrote {out}")
    print(f"train with: --prior {args.kind} --prior-path {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
