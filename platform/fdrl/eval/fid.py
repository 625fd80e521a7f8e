"""Standard FID and KID in the TF-Inception feature space (``fdrl.eval.inception``).

Feature sets stream into ``FeatureStats``: the float64 ``Moments`` (count, sum x, sum x x^T) for
the Fréchet distance plus the first ``keep`` raw feature rows for KID. Both merge in order, so
partial statistics from many workers combine into the same result as one pass. Reference
statistics of a shard set are cached per (manifest hash, weights sha256, sample limit) as a
safetensors file (no pickle). ``FeatureWorker`` and its work functions are what each actor of a
Ray fan-out runs; ``fdrl.workflows.standard_fid`` puts them together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from fdrl.core.chunks import CHUNK
from fdrl.core.priors import Moments
from fdrl.core.sampler import ChunkSampler
from fdrl.data.manifest import ShardSet
from fdrl.data.stream import StreamStats, iter_samples
from fdrl.eval.inception import FEATURE_DIM
from fdrl.eval.metrics import frechet_distance_from_moments, kid

KID_KEEP = 2000  # raw feature rows kept per set for KID (2000 x 2048 x 4 B = 16 MB)
KID_SUBSETS = 50
KID_SUBSET_SIZE = 1000


@dataclass
class FeatureStats:
    moments: Moments
    kept: torch.Tensor  # (<= keep, 2048) float32: the first rows, in stream order

    @classmethod
    def empty(cls, dim: int = 2048) -> "FeatureStats":
        return cls(Moments.zeros(dim), torch.empty(0, dim))

    @property
    def count(self) -> int:
        return self.moments.count

    def update(self, feats: torch.Tensor, keep: int = KID_KEEP) -> "FeatureStats":
        feats = feats.reshape(len(feats), -1)
        self.moments.update(feats)
        room = keep - len(self.kept)
        if room > 0:
            self.kept = torch.cat([self.kept, feats[:room].float()])
        return self

    def merge(self, later: "FeatureStats", keep: int = KID_KEEP) -> "FeatureStats":
        """This set followed by ``later`` (order matters only for which rows KID keeps)."""
        kept = torch.cat([self.kept, later.kept])[:keep]
        return FeatureStats(self.moments.merge(later.moments), kept)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"count": torch.tensor([self.count], dtype=torch.int64),
                   "total": self.moments.total, "outer": self.moments.outer,
                   "kept": self.kept.contiguous()}, str(tmp))
        os.replace(tmp, path)  # never a half-written cache entry
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        t = load_file(str(path))
        return cls(Moments(int(t["count"][0]), t["total"], t["outer"]), t["kept"])


def feature_stats(features: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, *,
                  limit: Optional[int] = None, keep: int = KID_KEEP,
                  progress: Optional[Callable[[int], None]] = None) -> FeatureStats:
    """Stream image batches through ``features``; stop after ``limit`` images when given."""
    stats: Optional[FeatureStats] = None
    for batch in batches:
        if limit is not None:
            batch = batch[:limit - (stats.count if stats else 0)]
            if len(batch) == 0:
                break
        feats = features(batch)
        stats = (stats or FeatureStats.empty(feats.shape[1])).update(feats, keep)
        if progress is not None:
            progress(len(batch))
    if stats is None:
        raise ValueError("no images to compute FID features on")
    return stats


def fid(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance_from_moments(a.moments, b.moments)


def kid_of(a: FeatureStats, b: FeatureStats, subsets: int = KID_SUBSETS,
           subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    # Subsets smaller than the sets, so they differ and the std means something at small N.
    m = max(2, min(subset_size, len(a.kept) // 2, len(b.kept) // 2))
    return kid(a.kept, b.kept, subsets=subsets, subset_size=m, seed=seed)


def fid_kid(a: FeatureStats, b: FeatureStats, seed: int = 0) -> dict[str, float]:
    kid_mean, kid_std = kid_of(a, b, seed=seed)
    return {"fid": fid(a, b), "kid_mean": kid_mean, "kid_std": kid_std,
            "n_samples": float(a.count), "n_reference": float(b.count)}


def reference_key(manifest: str, weights_sha256: str, limit: Optional[int] = None) -> str:
    """Cache name of a shard set's reference statistics: features depend on all three."""
    return f"fidref-{manifest[:16]}-{weights_sha256[:12]}-{'all' if limit is None else f'n{limit}'}"


# ---------------------------------------------------------------- work of a fan-out's actors

ITEM_IMAGES = CHUNK  # real images per work item: many items even from a few large shards


class FeatureWorker:
    """The Inception on one device, and, for generated images, a model's chunk sampler: what each
    actor of an FID fan-out holds. ``model``: (net, prior, pairing, flow settings)."""

    def __init__(self, device, weights: Optional[str] = None, model: Optional[tuple] = None):
        from fdrl.eval.inception import InceptionFeatures

        self.features = InceptionFeatures(weights, device)
        self.sampler = None if model is None else ChunkSampler(device, *model)


def shard_items(shard_set: ShardSet, limit: Optional[int] = None,
                start: int = 0) -> tuple[list[tuple], list[int]]:
    """Work items (shard set, shard, skip, take) covering images start .. start + limit in
    manifest order, and their sizes."""
    end = shard_set.total if limit is None else min(start + limit, shard_set.total)
    if end <= start:
        raise ValueError(f"{shard_set.root} has {shard_set.total} images: none from index {start}")
    items, sizes, offset = [], [], 0
    for name, count in zip(shard_set.shards, shard_set.counts):
        lo, hi = max(start, offset), min(end, offset + count)
        for piece in range(lo, hi, ITEM_IMAGES):
            take = min(ITEM_IMAGES, hi - piece)
            items.append((shard_set, name, piece - offset, take))
            sizes.append(take)
        offset += count
    return items, sizes


def shard_features(worker: FeatureWorker, item: tuple) -> torch.Tensor:
    """Features of samples skip .. skip + take of one shard (in shard order)."""
    shard_set, name, skip, take = item
    images = []
    for seen, (_, _, image) in enumerate(iter_samples(shard_set, StreamStats(), [name])):
        if seen >= skip + take:
            break
        if seen >= skip:
            images.append(image)
    if not images:
        return torch.empty(0, FEATURE_DIM)
    return worker.features(torch.stack(images))


def chunk_features(worker: FeatureWorker, item: tuple) -> torch.Tensor:
    """Features of one chunk of generated samples: ``item`` is (seed, index, size, steps)."""
    seed, index, size, steps = item
    x = worker.sampler.draw(seed, index, size, steps=steps)
    return worker.features(x.clamp(-1, 1))
