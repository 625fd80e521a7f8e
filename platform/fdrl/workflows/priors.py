"""The data-dependent prior of a shard set, fitted on Ray actors (one group of shards each) and
cached once per (manifest hash, kind, rank) under the storage."""

from __future__ import annotations

import time
from pathlib import Path

from fdrl.core.priors import Prior
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


def prior_cache_path(kind: str, rank: int, shard_set: ShardSet, storage: str) -> Path:
    return Path(storage) / "priors" / f"{manifest_hash(shard_set.root)[:16]}-{kind}-{rank}.safetensors"


def ensure_prior(kind: str, rank: int, seed: int, shard_set: ShardSet, path: str | Path) -> str:
    """The prior file at ``path``, fitted first when it is not there yet."""
    path = Path(path)
    if path.exists():
        print(f"prior: reusing {path}")
        return str(path)
    prior, seconds = fit_prior_distributed(shard_set, kind, rank=rank, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    prior.save(path)
    print(f"prior: fitted {kind} Gaussian on {prior.count} images in {seconds:.1f} s -> {path}")
    return str(path)
