"""Standard FID and KID in the TF-Inception feature space (``fdrl.eval.inception``).

Feature sets stream into ``FeatureStats``: the float64 ``Moments`` (count, sum x, sum x x^T) for
the Fréchet distance plus the first ``keep`` raw feature rows for KID. Both merge in order, so
partial statistics from many workers combine into the same result as one pass. Reference
statistics of a shard set are cached per (manifest hash, weights sha256, sample limit) as a
safetensors file (no pickle); ``fdrl.distributed.fid`` adds the MLflow artifact copy and Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from fdrl.core.priors import Moments
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


def default_cache_dir() -> Path:
    return Path(os.environ.get("FDRL_HOME") or os.getcwd()).expanduser().resolve() / "fid_cache"


def reference_stats(shard_dir: str | os.PathLike, features, *, limit: Optional[int] = None,
                    cache_dir: Optional[str | os.PathLike] = None,
                    compute: Optional[Callable[[], FeatureStats]] = None,
                    ) -> tuple[FeatureStats, Path, bool]:
    """A shard set's reference statistics, from the local cache or computed and cached.

    ``features`` is an ``InceptionFeatures`` (its ``weights_sha256`` is part of the key);
    ``compute`` replaces the single-process pass (``fdrl.distributed.fid`` passes Ray's).
    Returns (stats, cache file, whether it was already cached)."""
    from fdrl.data.manifest import manifest_hash
    from fdrl.eval.metrics import shard_batches

    key = reference_key(manifest_hash(shard_dir), features.weights_sha256, limit)
    path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
    if path.is_file():
        return FeatureStats.load(path), path, True
    stats = compute() if compute is not None else \
        feature_stats(features, shard_batches(shard_dir, 64, limit=limit), limit=limit)
    return stats, stats.save(path), False
