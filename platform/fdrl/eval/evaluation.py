"""Domain-feature evaluation inside training: KID between EMA samples and real images in the
feature space of a small classifier. Sweeps use it as their ASHA metric, because it is comparable
across pairings (the KL diagnostic is measured by each model's own ratio estimator)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from fdrl.core.chunks import chunk_seed
from fdrl.core.flow import FlowSettings
from fdrl.core.sampler import sample
from fdrl.data.manifest import ShardSet
from fdrl.data.stream import ShardStream, shard_batches
from fdrl.eval.classifier import MnistClassifier, load_labeled, save_classifier, train_classifier
from fdrl.eval.metrics import kid

KID_SUBSETS = 20


class DomainKID:
    """KID of ``n`` EMA samples (K + kappa flow steps, fixed seed) against ``n`` real images."""

    def __init__(self, classifier: MnistClassifier, shard_set: ShardSet, n: int, seed: int, device):
        self.features = classifier.to(device).features
        self.n, self.seed, self.device = n, seed, device
        real = next(ShardStream(shard_set, 0, 1, seed=seed).batches(n)).to(device)
        with torch.no_grad():
            self.real = self.features(real).cpu()

    def __call__(self, net, prior, pairing, flow: FlowSettings) -> float:
        x = sample(net, pairing, flow, self.n, self.seed, prior=prior, device=self.device).x
        with torch.no_grad():
            x = x.to(self.device)
            fake = self.features(x).cpu()
        if not torch.isfinite(fake).all():
            return float("inf")
        mean, _ = kid(fake, self.real, subsets=KID_SUBSETS, subset_size=self.n, seed=self.seed)
        return mean


def ensure_classifier(shard_dir: str, root: str, manifest: str, epochs: int = 6) -> str:
    """A feature classifier for this dataset, trained once per manifest and kept as a folder
    under ``root`` (a folder or an object-store URI)."""
    import tempfile

    from fdrl.data import storage

    folder = storage.join(str(root), "classifiers", manifest[:16])
    if storage.is_file(storage.join(folder, "model.safetensors")):
        return folder
    images, labels, keys = load_labeled(shard_dir)
    result = train_classifier(images, labels, keys, epochs=epochs, log=None)
    with tempfile.TemporaryDirectory() as tmp:
        local = save_classifier(result.model, Path(tmp) / "clf",
                                {"heldout_accuracy": result.heldout_accuracy})
        storage.put_dir(local, folder)
    print(f"feature classifier: held-out accuracy {result.heldout_accuracy:.4f} "
          f"({result.seconds:.0f} s) -> {folder}")
    return folder


# ------------------------------------------------------------------ offline model evaluation


@dataclasses.dataclass
class DomainReference:
    """The real side of the domain metrics of one shard set."""

    features: Callable[[torch.Tensor], torch.Tensor]  # the classifier's feature map
    train: torch.Tensor  # every image of the shard set
    real_a: torch.Tensor  # n images the samples are compared with
    real_b: torch.Tensor  # n other images: the real-vs-real baseline


def domain_reference(data: str | Path, n: int, seed: int,
                     classifier: MnistClassifier) -> DomainReference:
    """All images of ``data``, two disjoint seeded sets of ``n``, and ``classifier``'s features."""
    train = torch.cat(list(shard_batches(data)))
    if len(train) < 2 * n:
        raise ValueError(f"{data} has {len(train)} images; need 2 x --n = {2 * n}")
    features = classifier.features
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return DomainReference(features, train, train[order[:n]], train[order[n:2 * n]])


def flow_stages(model, n: int, seed: int, flow: FlowSettings) -> dict:
    """Prior samples, after K steps and after K + kappa steps (one continued flow, so the
    stages are the same trajectories), and the mean log r at every step: the KL curve."""
    k, total = flow.flow_steps, flow.sampling_steps
    drawn = sample(model.net, model.pairing, flow, n, seed, prior=model.prior,
                   record=(0, k, total), trace=True)
    names = {0: "prior", k: "K", total: "K+kappa"}
    return {"samples": {names[s]: drawn.stages[s] for s in (0, k, total)},
            "kl_curve": drawn.log_r.tolist()}


def stage_metrics(features, samples: dict, real_a: torch.Tensor, real_b: torch.Tensor,
                  seed: int = 0) -> dict[str, dict]:
    """Domain FD/KID/precision/recall of each stage against real_a, plus real_b vs real_a."""
    from fdrl.eval.metrics import feature_metrics

    kid_size = max(2, min(1000, len(real_a) // 2))  # subsets smaller than the sets, so they vary
    out = {}
    for name, x in {**samples, "real (baseline)": real_b}.items():
        out[name] = feature_metrics(features, x.split(256), real_a.split(256),
                                    kid_subsets=50, kid_subset_size=kid_size, seed=seed)
    return out


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, train: torch.Tensor, features, k: int = 5) -> dict:
    """Indices of the k nearest training images of each query, in pixel and in feature space."""
    def knn(q, t):
        return torch.cdist(q.flatten(1), t.flatten(1)).topk(k, largest=False).indices

    train_feats = torch.cat([features(b) for b in train.split(512)])
    return {"pixel": knn(queries, train), "feature": knn(features(queries), train_feats)}


def interpolation(model, rows: int, cols: int, seed: int, flow: FlowSettings) -> torch.Tensor:
    """Prior-space interpolation: between pairs of prior draws along the variance-preserving path
    mu + cos(t) (a - mu) + sin(t) (b - mu), t in [0, pi/2], each point flowed K + kappa steps
    without noise, so neighbouring images differ only by where they started."""
    # Row i's two ends come from its own generator: a row does not depend on how many rows there are.
    ends = [model.prior.sample(2, torch.Generator().manual_seed(chunk_seed(seed, i))) for i in range(rows)]
    a, b = torch.stack([e[0] for e in ends]), torch.stack([e[1] for e in ends])
    mean = getattr(model.prior, "mean", None)
    mu = mean.reshape(a.shape[1:]) if mean is not None else torch.zeros(a.shape[1:])
    t = torch.linspace(0, torch.pi / 2, cols)
    path = torch.stack([mu + torch.cos(s) * (a - mu) + torch.sin(s) * (b - mu) for s in t], dim=1)
    flat = path.reshape(rows * cols, *a.shape[1:])
    noiseless = dataclasses.replace(flow, nu=0.0)
    return sample(model.net, model.pairing, noiseless, seed=seed, start=flat).x
