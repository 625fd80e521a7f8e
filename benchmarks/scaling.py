"""Weak scaling of distributed FDRL training on CPU: the CIFAR10 architecture (11.4M parameters),
batch 8 per worker, K = 5, one torch thread per worker, 1 vs 2 Ray Train workers (DDP over gloo).

Prints images/s and step time for each worker count (median over the log windows after the
first, which holds start-up) and the weak-scaling efficiency = rate(2) / (2 * rate(1)).
``--rounds R`` repeats the 1-worker and 2-worker runs R times, alternating, and also prints each
round's efficiency and their median: this VM's bf16 throughput drifts by up to 2x over tens of
seconds (benchmarks/bf16_steadiness.py), so one pair of runs can mislead.
Also prints the median time per step each run waited for data (``data_wait_s``, rank 0).
Speed flags pass through: --precision bf16 --channels-last --prefetch 2 (docs/performance.md).
Usage: python benchmarks/scaling.py [--steps 24] [--precision bf16 --channels-last --prefetch 2]"""

import argparse
import statistics
import tempfile
from pathlib import Path

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import numpy as np
from PIL import Image


def synthetic_shards(root: Path) -> Path:
    """Random 32x32 RGB images: compute does not depend on content."""
    from fdrl.data.writer import convert

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(256):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:04d}.png")
    convert("folder", images, root / "shards", resolution=32, shard_size=32, progress=False)
    return root / "shards"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--prefetch", type=int, default=0, help="batches read ahead per worker")
    p.add_argument("--flow-steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="alternating 1-/2-worker pairs")
    args = p.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from fdrl.config import TrainConfig
    from fdrl.workflows.train import check_run, resolve, run_training

    ray.init(num_cpus=2)  # with the dashboard: Train's placement-group cleaner needs its State API
    tmp = Path(tempfile.mkdtemp(prefix="fdrl-scaling-"))
    shards = synthetic_shards(tmp)
    uri = f"sqlite:///{tmp}/mlflow.db"
    rounds = []
    for round_index in range(args.rounds):
        rows = {}
        for workers in (1, 2):
            cfg = TrainConfig(data=str(shards), dataset="synthetic", arch="cifar10", prior="uniform",
                              steps=args.steps, batch=8 * workers, workers=workers, threads=1,
                              flow_steps=args.flow_steps, extra_steps=0, precision=args.precision,
                              channels_last=args.channels_last, prefetch=args.prefetch, grid_size=1,
                              log_every=args.log_every,
                              checkpoint_every=10**9, sample_every=10**9, storage=str(tmp / "runs"),
                              tracking_uri=uri, run_name=f"r{round_index}-w{workers}")
            result = run_training(check_run(resolve(cfg)))
            client = MlflowClient(uri)
            run_id = result.mlflow_run_id
            rate = [m.value for m in client.get_metric_history(run_id, "images_per_s")][1:]
            step_time = [m.value for m in client.get_metric_history(run_id, "step_time")][1:]
            wait = [m.value for m in client.get_metric_history(run_id, "data_wait_s")][1:]
            rows[workers] = (statistics.median(rate), statistics.median(step_time), statistics.median(wait))
        rounds.append(rows)
    ray.shutdown()
    for i, rows in enumerate(rounds):
        if args.rounds > 1:
            print(f"\nround {i + 1}")
        print("\n| workers | global batch | images/s | step time (s) | data wait per step (s) |")
        print("|---|---|---|---|---|")
        for w, (rate, st, wait) in rows.items():
            print(f"| {w} | {8 * w} | {rate:.2f} | {st:.3f} | {wait:.4f} |")
        print(f"\nweak-scaling efficiency (rate(2) / 2 rate(1)): {efficiency(rows):.2f}")
    if args.rounds > 1:
        effs = [efficiency(rows) for rows in rounds]
        print(f"\nper-round efficiencies: {' '.join(f'{e:.2f}' for e in effs)}; "
              f"median {statistics.median(effs):.2f}")


def efficiency(rows: dict) -> float:
    return rows[2][0] / (2 * rows[1][0])


if __name__ == "__main__":
    main()
