"""Throughput of distributed sampling (fdrl.sampling.sample_distributed, what jobs/sample.py runs)
from a freshly registered mnist32 model (random weights: the cost does not depend on them):
N = 256 samples, K + kappa = 20 + 20 flow steps, chunks of 64, 1 vs 2 Ray workers (1 CPU and
1 torch thread each). The time includes starting the actors and shipping the model to them.

Prints a markdown table (best of --repeats runs) and the speed-up rate(2) / rate(1).
Usage: python benchmarks/sampling.py [--n 256] [--repeats 2]"""

import argparse
import tempfile
import time
from pathlib import Path

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)


def register_random_model(root: Path) -> tuple[str, str]:
    import torch

    from fdrl.data.checkpoint import save_checkpoint
    from fdrl.config import TrainConfig
    from fdrl.core.networks import build_network
    from fdrl.tracking.registry import log_fdrl_model
    from fdrl.tracking.tracker import Tracker
    from fdrl.core.step import make_state

    uri = f"sqlite:///{root}/mlflow.db"
    torch.manual_seed(0)
    state = make_state(build_network("mnist32"), lr=1e-3)
    cfg = TrainConfig(dataset="bench", arch="mnist32", prior="uniform", flow_steps=20,
                      extra_steps=20)
    ckpt = save_checkpoint(root / "ckpt", state, cfg.to_dict(), [{}])
    run_id = Tracker("bench", run_name="random-weights", tracking_uri=uri).run_id
    log_fdrl_model(run_id, ckpt, None, cfg.to_dict(), "fdrl-bench", uri)
    return "models:/fdrl-bench@candidate", uri


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import numpy as np
    import ray

    from fdrl.tracking.registry import load_fdrl_model
    from fdrl.workflows.sample import sample_distributed

    ray.init(num_cpus=2)  # with the dashboard: Train's placement-group cleaner needs its State API
    model_uri, uri = register_random_model(Path(tempfile.mkdtemp(prefix="fdrl-bench-")))
    model = load_fdrl_model(model_uri, uri)
    rows, outputs = {}, {}
    for workers in (1, 2):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs[workers] = sample_distributed(model, args.n, 0, workers, args.batch,
                                                  progress=False)
            times.append(time.perf_counter() - start)
        rows[workers] = min(times)
    ray.shutdown()
    steps = model.config.flow_steps + model.config.extra_steps
    print(f"\nmnist32 (random weights), N = {args.n}, K + kappa = {steps}, chunks of {args.batch}, "
          f"best of {args.repeats}")
    print("\n| workers | wall time (s) | images/s |")
    print("|---|---|---|")
    for w, seconds in rows.items():
        print(f"| {w} | {seconds:.2f} | {args.n / seconds:.1f} |")
    print(f"\nspeed-up (rate(2) / rate(1)): {rows[1] / rows[2]:.2f}")
    print(f"identical samples for 1 and 2 workers: {np.array_equal(outputs[1], outputs[2])}")


if __name__ == "__main__":
    main()
