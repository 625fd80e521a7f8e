"""Standard FID on Ray: Inception features of real shards and of generated samples, streamed over
actors, merged on the driver in a fixed order.

* Each actor holds one copy of the Inception (one GPU each when the cluster has GPUs, else one
  CPU with one torch thread) and, for generated samples, the ratio network and prior.
* Work items are shards (real data) or the core sampler's chunks (generated data, seeded per
  (seed, chunk index)), so the result does not depend on the number of workers.
* Items return (size, 2048) float32 features, never images at 299^2; the driver folds them into
  ``FeatureStats`` in item order as they arrive, so memory stays at a few chunks even for 50k.
* Reference statistics come from the local cache, else the MLflow artifact store, else are
  computed here and stored in both.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fdrl.core.sampler import CHUNK, chunks
from fdrl.eval.fid import KID_KEEP, FeatureStats, default_cache_dir, fid_kid, reference_key

IN_FLIGHT = 2  # items queued per actor
ITEM_IMAGES = CHUNK  # real images per work item (an item decodes its shard up to its start: cheap next to 299^2)


class _FeatureActor:
    def __init__(self, weights: Optional[str], use_gpu: bool):
        from fdrl.eval.inception import InceptionFeatures

        if not use_gpu:
            torch.set_num_threads(1)
        self.features = InceptionFeatures(weights, "cuda" if use_gpu else "cpu")
        self.device = self.features.device
        self.model = None

    def set_model(self, arch: str, state: dict, prior, pairing_name: str, flow) -> None:
        from fdrl.core.divergences import get_pairing
        from fdrl.core.networks import build_network

        net = build_network(arch)
        net.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
        self.model = (net.to(self.device).eval().requires_grad_(False), prior.to(self.device),
                      get_pairing(pairing_name), flow)

    def shard(self, root: str, name: str, skip: int, take: int) -> np.ndarray:
        """Features of samples skip .. skip + take of one shard (in shard order)."""
        from fdrl.data.manifest import open_shard_set
        from fdrl.data.stream import StreamStats, iter_samples

        out, buf, seen = [], [], 0
        for _, _, image in iter_samples(open_shard_set(root), StreamStats(), [name]):
            seen += 1
            if seen <= skip:
                continue
            buf.append(image)
            if len(buf) == CHUNK or seen == skip + take:
                out.append(self.features(torch.stack(buf)))
                buf = []
            if seen == skip + take:
                break
        if buf:
            out.append(self.features(torch.stack(buf)))
        return torch.cat(out).numpy() if out else np.empty((0, 2048), np.float32)

    def chunk(self, seed: int, index: int, size: int, steps: Optional[int]) -> np.ndarray:
        from fdrl.core.sampler import sample_chunk

        net, prior, pairing, flow = self.model
        x = sample_chunk(net, pairing, flow, seed, index, size, prior=prior, steps=steps,
                         device=self.device).x
        return self.features(x.clamp(-1, 1)).numpy()


@contextmanager
def feature_actors(workers: int, weights: Optional[str] = None):
    """``workers`` Inception actors (a GPU each when the cluster has GPUs), killed on exit."""
    import ray

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not ray.is_initialized():
        ray.init()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    cls = ray.remote(**({"num_gpus": 1} if use_gpu else {"num_cpus": 1}))(_FeatureActor)
    actors = [cls.remote(weights, use_gpu) for _ in range(workers)]
    try:
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)


def _run(actors, method: str, items: list[tuple], sizes: list[int], desc: str,
         progress: bool, keep: int = KID_KEEP) -> FeatureStats:
    """Run ``method(*item)`` over ``items`` on ``actors``; fold the features in item order."""
    import ray
    from tqdm import tqdm

    queue = list(enumerate(items))
    pending, ready = {}, {}
    stats, next_index = None, 0

    def submit(actor):
        index, item = queue.pop(0)
        pending[getattr(actor, method).remote(*item)] = (actor, index)

    for _ in range(IN_FLIGHT):
        for actor in actors:
            if queue:
                submit(actor)
    with tqdm(total=sum(sizes), unit="img", desc=f"{desc} ({len(actors)} workers)",
              disable=not progress) as bar:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, index = pending.pop(ref)
            ready[index] = torch.tensor(ray.get(ref))  # a copy: object-store arrays are read-only
            bar.update(len(ready[index]))
            if queue:
                submit(actor)
            while next_index in ready:  # fold in item order: the result ignores scheduling
                feats = ready.pop(next_index)
                stats = (stats or FeatureStats.empty(feats.shape[1])).update(feats, keep)
                next_index += 1
    if stats is None or stats.count == 0:
        raise ValueError(f"{desc}: no images")
    return stats


def _shard_items(shard_dir: str | os.PathLike, limit: Optional[int], start: int = 0) -> tuple[list, list]:
    """(root, shard, skip, take) covering images start .. start + limit in manifest order."""
    from fdrl.data.manifest import open_shard_set

    shard_set = open_shard_set(shard_dir)
    end = shard_set.total if limit is None else min(start + limit, shard_set.total)
    if end <= start:
        raise ValueError(f"{shard_dir} has {shard_set.total} images: none from index {start}")
    items, sizes, offset = [], [], 0
    for name, count in zip(shard_set.shards, shard_set.counts):
        lo, hi = max(start, offset), min(end, offset + count)
        for piece in range(lo, hi, ITEM_IMAGES):  # pieces, so few big shards still spread out
            take = min(ITEM_IMAGES, hi - piece)
            items.append((str(shard_set.root), name, piece - offset, take))
            sizes.append(take)
        offset += count
    return items, sizes


def shard_stats_distributed(shard_dir: str | os.PathLike, *, limit: Optional[int] = None,
                            start: int = 0, workers: int = 2, weights: Optional[str] = None,
                            progress: bool = True, actors=None) -> FeatureStats:
    """Features of a shard set's images start .. start + limit (manifest order), a shard per item."""
    items, sizes = _shard_items(shard_dir, limit, start)
    if actors is None:
        with feature_actors(min(workers, len(items)), weights) as own:
            return _run(own, "shard", items, sizes, "FID real images", progress)
    return _run(actors, "shard", items, sizes, "FID real images", progress)


def sample_stats_distributed(net, prior, pairing_name: str, flow, arch: str, n: int, seed: int, *,
                             steps: Optional[int] = None, workers: int = 2,
                             weights: Optional[str] = None, progress: bool = True,
                             actors=None) -> FeatureStats:
    """Features of ``n`` samples after ``steps`` flow steps (default K + kappa; 0: the prior),
    drawn chunk by chunk with the core sampler, so they are the samples ``sample`` gives."""
    import ray

    todo = chunks(n)
    if actors is None:
        with feature_actors(min(workers, len(todo)), weights) as own:
            return sample_stats_distributed(net, prior, pairing_name, flow, arch, n, seed,
                                            steps=steps, progress=progress, actors=own)
    state = ray.put({k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})
    prior_ref = ray.put(prior.to("cpu"))
    ray.get([a.set_model.remote(arch, state, prior_ref, pairing_name, flow) for a in actors])
    return _run(actors, "chunk", [(seed, i, size, steps) for i, _, size in todo],
                [size for _, _, size in todo], f"FID samples ({steps if steps is not None else 'K+kappa'} steps)",
                progress)


def ensure_reference(shard_dir: str | os.PathLike, *, limit: Optional[int] = None, workers: int = 2,
                     weights: Optional[str] = None, cache_dir: Optional[str | os.PathLike] = None,
                     tracking_uri: Optional[str] = None, use_mlflow: bool = True,
                     progress: bool = True) -> tuple[Path, str]:
    """The reference statistics file of ``shard_dir``: local cache, else MLflow, else computed on
    Ray and stored in both. Returns (path, where it came from: 'local' | 'mlflow' | 'computed')."""
    from fdrl.data.hashing import sha256_file
    from fdrl.data.manifest import manifest_hash
    from fdrl.eval.inception import resolve_weights

    weights_sha = sha256_file(resolve_weights(weights))
    key = reference_key(manifest_hash(shard_dir), weights_sha, limit)
    cache = Path(cache_dir or default_cache_dir())
    path = cache / f"{key}.safetensors"
    if path.is_file():
        return path, "local"
    if use_mlflow:
        from fdrl.tracking.fid_reference import fetch_reference

        got = fetch_reference(key, cache, tracking_uri)
        if got is not None:
            return got, "mlflow"
    start = time.perf_counter()
    stats = shard_stats_distributed(shard_dir, limit=limit, workers=workers, weights=weights,
                                    progress=progress)
    stats.save(path)
    if use_mlflow:
        from fdrl.tracking.fid_reference import store_reference

        store_reference(path, key, tracking_uri,
                        {"data": str(Path(shard_dir).resolve()), "limit": limit or "all",
                         "images": stats.count, "weights_sha256": weights_sha,
                         "seconds": round(time.perf_counter() - start, 1)})
    return path, "computed"


def stage_fids(model, shard_dir: str | os.PathLike, n: int, seed: int = 0, *, flow=None,
               stages: Optional[dict] = None, real_vs_real: bool = True,
               reference_limit: Optional[int] = None, workers: int = 2,
               weights: Optional[str] = None, tracking_uri: Optional[str] = None,
               progress: bool = True) -> dict[str, dict[str, float]]:
    """Standard FID/KID of ``n`` samples of a registered model (``registry.LoadedModel``) at each
    of ``stages`` (name -> flow steps; default prior, K, K + kappa: the same trajectories, as
    chunks are seeded alone) against the reference statistics of the data's first
    ``reference_limit`` images (default: all), and of ``n`` other real images against them
    (``real_vs_real``; needs that many images beyond the reference). Streams: nothing at 299^2
    is held beyond a few chunks, so n = 50000 runs in bounded memory."""
    from fdrl.data.manifest import open_shard_set

    flow = flow or model.flow
    if stages is None:
        stages = {"prior": 0, "K": flow.flow_steps, "K+kappa": flow.sampling_steps}
    ref_path, _ = ensure_reference(shard_dir, limit=reference_limit, workers=workers, weights=weights,
                                   tracking_uri=tracking_uri, progress=progress)
    reference = FeatureStats.load(ref_path)
    out = {}
    with feature_actors(workers, weights) as actors:
        for name, steps in stages.items():
            start = time.perf_counter()
            fake = sample_stats_distributed(model.net, model.prior, model.config.pairing, flow,
                                            model.config.arch, n, seed, steps=steps,
                                            progress=progress, actors=actors)
            out[name] = {**fid_kid(fake, reference, seed), "seconds": time.perf_counter() - start}
        total = open_shard_set(shard_dir).total
        if real_vs_real and reference.count + n <= total:
            start = time.perf_counter()
            real = shard_stats_distributed(shard_dir, limit=n, start=reference.count,
                                           progress=progress, actors=actors)
            out["real (baseline)"] = {**fid_kid(real, reference, seed),
                                      "seconds": time.perf_counter() - start}
    return out
