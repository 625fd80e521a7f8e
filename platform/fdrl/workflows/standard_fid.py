"""Standard FID of shard sets and of registered models, with the Inception features streamed over
Ray actors (``fdrl.distributed.fanout``) and folded in item order on the driver.

Work items are pieces of shards (real images) or the sampler's chunks (generated images, seeded
per (seed, chunk index)), so a result never depends on the number of workers. Items return
(size, 2048) features, never images at 299^2, so memory stays at a few items even for FID-50k.
Reference statistics come from the local cache, else the MLflow artifact store, else are
computed here and stored in both.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

from fdrl.core.chunks import chunks
from fdrl.data import storage
from fdrl.data.hashing import sha256_file
from fdrl.data.manifest import ShardSet, manifest_hash, open_shard_set
from fdrl.distributed.fanout import ActorPool
from fdrl.env import home
from fdrl.eval.fid import (FeatureStats, FeatureWorker, chunk_features, fid_kid, reference_key,
                           shard_features, shard_items)
from fdrl.eval.inception import resolve_weights


def _fold(results, desc: str) -> FeatureStats:
    stats = None
    for _, feats in results:  # in item order: the result ignores scheduling
        stats = (stats or FeatureStats.empty(feats.shape[1])).update(feats)
    if stats is None or stats.count == 0:
        raise ValueError(f"{desc}: no images")
    return stats


def shard_stats(pool: ActorPool, shard_set: ShardSet, *, limit: Optional[int] = None,
                start: int = 0, progress: bool = True) -> FeatureStats:
    """Features of a shard set's images start .. start + limit (manifest order)."""
    items, sizes = shard_items(shard_set, limit, start)
    return _fold(pool.map(shard_features, items, sizes=sizes, desc="FID real images",
                          progress=progress), "FID real images")


def sample_stats(pool: ActorPool, n: int, seed: int, steps: Optional[int] = None,
                 progress: bool = True) -> FeatureStats:
    """Features of ``n`` samples of the pool's model after ``steps`` flow steps (default
    K + kappa; 0: the prior), the chunks ``core.sampler.sample`` draws."""
    todo = chunks(n)
    desc = f"FID samples ({steps if steps is not None else 'K+kappa'} steps)"
    return _fold(pool.map(chunk_features, [(seed, c.index, c.size, steps) for c in todo],
                          sizes=[c.size for c in todo], desc=desc, progress=progress), desc)


def ensure_reference(data: str | Path, *, limit: Optional[int] = None, workers: int = 2,
                     weights: Optional[str] = None, cache_dir: Optional[str] = None,
                     tracking_uri: Optional[str] = None, use_mlflow: bool = True,
                     progress: bool = True) -> tuple[str, str]:
    """The reference statistics file of the shard set ``data`` in ``cache_dir`` (a folder or a
    URI; default $FDRL_HOME/fid_cache), named by what determines it: found there, else fetched
    from MLflow, else computed on Ray and stored in both. Returns (path, where it came from:
    'local' | 'mlflow' | 'computed')."""
    shard_set = open_shard_set(data)
    weights_sha = sha256_file(resolve_weights(weights))
    key = reference_key(manifest_hash(shard_set.root), weights_sha, limit)
    cache = cache_dir or str(home() / "fid_cache")
    path = storage.join(cache, f"{key}.safetensors")
    if storage.is_file(path):
        return path, "local"
    with tempfile.TemporaryDirectory() as tmp:
        if use_mlflow:
            from fdrl.tracking.fid_reference import fetch_reference

            got = fetch_reference(key, tmp, tracking_uri)
            if got is not None:
                storage.put_file(got, path)
                return path, "mlflow"
        start = time.perf_counter()
        items, _ = shard_items(shard_set, limit)
        with ActorPool(min(workers, len(items)), FeatureWorker, weights) as pool:
            stats = shard_stats(pool, shard_set, limit=limit, progress=progress)
        local = stats.save(Path(tmp) / f"{key}.safetensors")
        storage.put_file(local, path)
        if use_mlflow:
            from fdrl.tracking.fid_reference import store_reference

            store_reference(local, key, tracking_uri,
                            {"data": str(shard_set.root), "limit": limit or "all",
                             "images": stats.count, "weights_sha256": weights_sha,
                             "seconds": round(time.perf_counter() - start, 1)})
    return path, "computed"


def stage_fids(model, data: str | Path, n: int, seed: int = 0, *, flow=None,
               stages: Optional[dict] = None, real_vs_real: bool = True,
               reference_limit: Optional[int] = None, workers: int = 2,
               weights: Optional[str] = None, tracking_uri: Optional[str] = None,
               progress: bool = True) -> dict[str, dict[str, float]]:
    """Standard FID/KID of ``n`` samples of a registered model (``registry.LoadedModel``) at each
    of ``stages`` (name -> flow steps; default prior, K, K + kappa: the same trajectories, as
    chunks are seeded alone) against the reference statistics of the data's first
    ``reference_limit`` images (default: all), and of ``n`` other real images against them
    (``real_vs_real``; needs that many images beyond the reference)."""
    flow = flow or model.flow
    if stages is None:
        stages = {"prior": 0, "K": flow.flow_steps, "K+kappa": flow.sampling_steps}
    ref_path, _ = ensure_reference(data, limit=reference_limit, workers=workers, weights=weights,
                                   tracking_uri=tracking_uri, progress=progress)
    reference = FeatureStats.load(storage.node_copy(ref_path))
    shard_set = open_shard_set(data)
    out = {}
    model_parts = (model.net, model.prior, model.pairing, flow)
    with ActorPool(workers, FeatureWorker, weights, model_parts) as pool:
        for name, steps in stages.items():
            start = time.perf_counter()
            fake = sample_stats(pool, n, seed, steps, progress)
            out[name] = {**fid_kid(fake, reference, seed), "seconds": time.perf_counter() - start}
        if real_vs_real and reference.count + n <= shard_set.total:
            start = time.perf_counter()
            real = shard_stats(pool, shard_set, limit=n, start=reference.count, progress=progress)
            out["real (baseline)"] = {**fid_kid(real, reference, seed),
                                      "seconds": time.perf_counter() - start}
    return out
