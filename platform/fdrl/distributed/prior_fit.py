"""Fit the data-dependent prior with Ray tasks: each task streams a group of shards into mergeable
statistics, the driver merges them (in a fixed order, so the result is reproducible) and factors
the covariance, fully or in low-rank form."""

from __future__ import annotations

import math
import time

import ray
import torch

from fdrl.data.manifest import ShardSet

from fdrl.data.stream import StreamStats, iter_samples
from fdrl.core.priors import Moments, Prior, Sketch, fit_full, fit_lowrank

SKETCH_OVERSAMPLE = 10  # extra sketch columns beyond the rank, for accuracy of the top eigenpairs
FULL_MAX_DIM = 64 * 64 * 3  # above this a d x d float64 matrix per task is too big: use the sketch


@ray.remote
def _group_stats(shard_set: ShardSet, shards: list[str], kind: str, width: int, seed: int):
    dim = math.prod(shard_set.shape)
    stats = Moments.zeros(dim) if kind == "moments" else Sketch.zeros(dim, width, seed)
    omega = Sketch.test_matrix(dim, width, seed) if kind == "sketch" else None
    skipped = StreamStats()
    for shard in shards:  # one shard at a time: memory stays at one shard's images
        images = [image for _, _, image in iter_samples(shard_set, skipped, [shard])]
        if images:
            batch = torch.stack(images)
            stats.update(batch, omega) if omega is not None else stats.update(batch)
    return stats, skipped.skipped


def fit_prior_distributed(shard_set: ShardSet, kind: str, rank: int = 512, tasks: int = 0,
                          seed: int = 0) -> tuple[Prior, float]:
    """Returns the fitted prior and the seconds taken. ``kind``: "full" or "lowrank"."""
    if kind not in ("full", "lowrank"):
        raise ValueError(f"only data-dependent priors are fitted, not {kind!r}")
    start = time.perf_counter()
    dim = math.prod(shard_set.shape)
    use_sketch = kind == "lowrank" and dim > FULL_MAX_DIM
    stat_kind = "sketch" if use_sketch else "moments"
    width = min(rank + SKETCH_OVERSAMPLE, dim)
    tasks = tasks or max(1, min(len(shard_set.shards), int(ray.available_resources().get("CPU", 1))))
    groups = [list(shard_set.shards[i::tasks]) for i in range(tasks)]
    refs = [_group_stats.remote(shard_set, g, stat_kind, width, seed) for g in groups if g]
    results = _gather_with_progress(refs, f"prior fit ({shard_set.total} images)")
    merged = None
    for stats, _skipped in results:  # merged in group order: the same prior however tasks finish
        merged = stats if merged is None else merged.merge(stats)
    if kind == "full":
        prior = fit_full(merged, shard_set.shape, clamp=1.0)
    else:
        prior = fit_lowrank(merged, shard_set.shape, rank=min(rank, dim), clamp=1.0)
    return prior, time.perf_counter() - start


def _gather_with_progress(refs: list, desc: str) -> list:
    """``ray.get(refs)`` in order, advancing a progress bar as each task finishes."""
    from tqdm import tqdm

    index = {ref: i for i, ref in enumerate(refs)}
    results, pending = [None] * len(refs), list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[index[done[0]]] = ray.get(done[0])
            bar.update(1)
    return results
