"""What ``jobs/train_classifier.py`` does: train an image classifier on a labelled shard set and
register it (``fdrl.tracking.classifiers``). It serves as the feature network of the domain
metrics and, trained adversarially (L2 PGD), as the robust classifier of class guidance."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

from fdrl.data import storage
from fdrl.config import check_model_name
from fdrl.eval.classifier import (ClassifierConfig, PGDSettings, load_labeled, save_classifier,
                                  strided_subset, train_classifier)


def train_and_register(**options) -> dict:
    """``options``: the flags of ``jobs/train_classifier.py`` (data, dataset, name, epochs, batch,
    lr, seed, limit, out, tracking_uri, pgd_eps, pgd_steps, pgd_step_size, channels,
    feature_dim, experiment, no_register). Returns the summary also written to out/result.json."""
    from fdrl.data.manifest import manifest_hash

    args = SimpleNamespace(**options)
    if args.data is None:
        from fdrl.data.writer import ensure_mnist_shards
        from fdrl.presets import MNIST_DATA

        args.data = ensure_mnist_shards(MNIST_DATA)
        args.dataset = args.dataset or "mnist"
    args.dataset = args.dataset or storage.name(storage.resolve(args.data))
    args.name = args.name or f"classifier-{args.dataset}"
    if not args.no_register:
        check_model_name(args.name, "--name (or the --dataset it defaults from)")
    adversary = PGDSettings(args.pgd_eps, args.pgd_steps, args.pgd_step_size) if args.pgd_eps else None
    images, labels, keys = load_labeled(args.data)
    digest = manifest_hash(args.data)
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
    info = {"data": storage.resolve(args.data), "manifest_hash": digest,
            "dataset": args.dataset, "pgd": asdict(adversary) if adversary else None}
    save_classifier(result.model, args.out,
                    {"heldout_accuracy": result.heldout_accuracy, "n_train": result.n_train,
                     "n_heldout": result.n_heldout, **info})
    summary = {"heldout_accuracy": result.heldout_accuracy,
               "train_accuracy": result.train_accuracy, "seconds": round(result.seconds, 1),
               "n_train": result.n_train, "n_heldout": result.n_heldout, "local": str(args.out)}
    if not args.no_register:
        from fdrl.tracking.classifiers import register_classifier

        params = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                  "limit": args.limit, "pgd_eps": args.pgd_eps, "pgd_steps": args.pgd_steps,
                  "pgd_step_size": adversary.alpha if adversary else 0.0,
                  "split": "crc32(key) % 100 < 10 held out", "architecture": vars(result.model.config)}
        run_id, version = register_classifier(result, args.name, tracking_uri=args.tracking_uri,
                                              experiment=args.experiment, params=params, info=info)
        summary.update(run_id=run_id, model_uri=f"models:/{args.name}/{version}",
                       alias=f"models:/{args.name}@candidate")
    (Path(args.out) / "result.json").write_text(json.dumps(summary, indent=1))
    return summary
