"""Domain-feature evaluation inside training: KID between EMA samples and real images in the
feature space of a small classifier. Sweeps use it as their ASHA metric, because it is comparable
across pairings (the KL diagnostic is measured by each model's own ratio estimator)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .classifier import load_classifier, load_labeled, save_classifier, train_classifier
from .data import ShardSet, ShardStream
from .metrics import kid
from .train import FlowParams, sample

KID_SUBSETS = 20


class DomainKID:
    """KID of ``n`` EMA samples (K + kappa flow steps, fixed seed) against ``n`` real images."""

    def __init__(self, classifier: str, shard_set: ShardSet, n: int, seed: int,
                 device, tracking_uri: Optional[str] = None):
        self.features = load_classifier(classifier, tracking_uri).to(device).features
        self.n, self.seed, self.device = n, seed, device
        real = next(ShardStream(shard_set, 0, 1, seed=seed).batches(n)).to(device)
        with torch.no_grad():
            self.real = self.features(real).cpu()

    def __call__(self, net, prior, pairing, flow_params: FlowParams, extra_steps: int) -> float:
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        x = sample(net, prior, pairing, self.n, flow_params, extra_steps, gen, self.device)
        with torch.no_grad():
            fake = self.features(x).cpu()
        if not torch.isfinite(fake).all():
            return float("inf")
        mean, _ = kid(fake, self.real, subsets=KID_SUBSETS, subset_size=self.n, seed=self.seed)
        return mean


def ensure_classifier(shard_dir: str | Path, storage: Path, manifest: str, epochs: int = 6) -> str:
    """A feature classifier for this dataset, trained once per manifest and kept as a folder."""
    folder = storage / "classifiers" / manifest[:16]
    if (folder / "model.safetensors").exists():
        return str(folder)
    images, labels, keys = load_labeled(shard_dir)
    result = train_classifier(images, labels, keys, epochs=epochs, log=None)
    save_classifier(result.model, folder, {"heldout_accuracy": result.heldout_accuracy})
    print(f"feature classifier: held-out accuracy {result.heldout_accuracy:.4f} "
          f"({result.seconds:.0f} s) -> {folder}")
    return str(folder)
