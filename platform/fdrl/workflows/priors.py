"""The data-dependent prior of a shard set, fitted on Ray actors (one group of shards each) and
cached once per (manifest hash, kind, rank) under the storage."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fdrl.core.priors import Prior
from fdrl.data import storage
from fdrl.data.manifest import ShardSet, manifest_hash
from fdrl.data.prior_fit import PriorFit, fit_prior, group_stats, shard_groups
from fdrl.distributed.cluster import available_cpus
from fdrl.distributed.fanout import fan_out

FITTED_PRIORS = ("full", "lowrank")


def fit_prior_distributed(shard_set: ShardSet, kind: str, rank: int = 512, tasks: int = 0,
                          seed: int = 0) -> tuple[Prior, float]:
    """The fitted prior and the seconds taken. ``tasks``: groups of shards (default: one per
    available CPU, at most one per shard)."""
    start = time.perf_counter()
    fit = PriorFit(shard_set, kind, rank, seed)
    groups = shard_groups(shard_set, tasks or available_cpus())
    results = fan_out(len(groups), _setup, [fit], _work, groups, desc=f"prior fit "
                      f"({shard_set.total} images)", progress=True, gpu=False)
    skipped = sum(n for _, n in results)
    if skipped:
        print(f"prior fit: skipped {skipped} corrupt samples (the rest of their shards was used)")
    return fit_prior(fit, [stats for stats, _ in results]), time.perf_counter() - start


def _setup(device, fit: PriorFit) -> PriorFit:
    return fit


def _work(fit: PriorFit, shards: list[str]):
    return group_stats(fit, shards)


def prior_cache_path(kind: str, rank: int, shard_set: ShardSet, root: str) -> str:
    """Where a storage keeps the prior of a shard set: named by what determines it."""
    return storage.join(root, "priors", f"{manifest_hash(shard_set.root)[:16]}-{kind}-{rank}.safetensors")


def save_prior(prior: Prior, path: str) -> None:
    """A prior file written completely or not at all, wherever ``path`` is."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / storage.name(path)
        prior.save(local)
        storage.put_file(local, path)


def ensure_prior(kind: str, rank: int, seed: int, shard_set: ShardSet, path: str) -> str:
    """The prior file at ``path`` (a local path or a URI), fitted first when it is not there."""
    if storage.exists(path):
        print(f"prior: reusing {path}")
        return path
    prior, seconds = fit_prior_distributed(shard_set, kind, rank=rank, seed=seed)
    save_prior(prior, path)
    print(f"prior: fitted {kind} Gaussian on {prior.count} images in {seconds:.1f} s -> {path}")
    return path
