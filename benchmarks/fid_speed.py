"""Speed of standard-FID feature extraction (TF Inception at 299 x 299, fdrl.eval.inception) on
MNIST-5k digits: one process with --threads torch threads, and Ray actors (fdrl.distributed.fid,
1 CPU and 1 thread each, or a GPU each where there are GPUs) over the same images. Prints
images/s and seconds per 1000 images. The Ray time includes starting the actors and loading the
network in each. On a shared machine compare the two rows of one run, not runs.

Usage: python benchmarks/fid_speed.py [--n 128] [--threads 2] [--workers 2]"""

import argparse
import tempfile
import time
from pathlib import Path

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    import ray
    import torch

    from fdrl.data.manifest import open_shard_set
    from fdrl.data.stream import shard_batches
    from fdrl.data.writer import convert
    from fdrl.distributed.fanout import ActorPool
    from fdrl.eval.fid import FeatureWorker, feature_stats
    from fdrl.eval.inception import InceptionFeatures
    from fdrl.workflows.standard_fid import shard_stats

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "mnist"
        convert("mnist", None, shards, shard_size=32, limit=args.n, progress=False)
        torch.set_num_threads(args.threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        features = InceptionFeatures(device=device)
        features(torch.zeros(2, 1, 32, 32))  # first call: TorchScript profiling run
        start = time.perf_counter()
        local = feature_stats(features, shard_batches(shards, 64))
        rows.append((f"1 process, {args.threads} threads ({device})", local.count,
                     time.perf_counter() - start))
        ray.init()
        start = time.perf_counter()
        with ActorPool(args.workers, FeatureWorker) as pool:
            dist = shard_stats(pool, open_shard_set(shards), progress=False)
        rows.append((f"Ray, {args.workers} actors", dist.count, time.perf_counter() - start))
        ray.shutdown()
    print("| extraction | images | seconds | images/s | s per 1000 images |")
    print("|---|---|---|---|---|")
    for name, n, s in rows:
        print(f"| {name} | {n} | {s:.1f} | {n / s:.2f} | {1000 * s / n:.0f} |")


if __name__ == "__main__":
    main()
