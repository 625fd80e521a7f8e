"""Data wait with shards on object storage: the demo configuration trained from MNIST-5k shards on
a local S3-compatible server (moto, started here) and from the same shards on local disk, in one
run, interleaved. Prints, per source, the mean data wait per step, the mean step time and their
ratio (the issue's bound: <= 2%), read from the MLflow metrics rank 0 reported.

    python benchmarks/data_wait_s3.py --steps 60 --rounds 2
"""

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow)

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _servers():
    spec = importlib.util.spec_from_file_location("fdrl_test_servers", REPO / "tests" / "servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2, help="local, S3 pairs (interleaved)")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the means")
    args = p.parse_args()

    from mlflow.tracking import MlflowClient

    from fdrl.data.writer import convert
    from fdrl.presets import MNIST
    from fdrl.workflows.train import check_run, resolve, run_training

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "s3").mkdir()
        s3 = _servers().S3Server(tmp / "s3").start()
        try:
            os.environ.update(s3.env())
            local = tmp / "mnist5k"
            convert("mnist", None, local, shard_size=1000, progress=False)
            remote = f"{s3.bucket()}/mnist5k"
            convert("mnist", None, remote, shard_size=1000, progress=False)
            uri = f"sqlite:///{tmp}/mlflow.db"
            rows = []
            for r in range(args.rounds):
                for name, data in (("local disk", str(local)), ("S3 (moto)", remote)):
                    cfg = dataclasses.replace(
                        MNIST, data=data, steps=args.steps, log_every=5, checkpoint_every=10**9,
                        sample_every=10**9, fid=False, register=False, storage=str(tmp / "runs"),
                        tracking_uri=uri, run_name=f"r{r}-{name.split()[0].lower()}")
                    result = run_training(check_run(resolve(cfg)))
                    client = MlflowClient(uri)
                    hist = {k: [m for m in client.get_metric_history(result.mlflow_run_id, k)
                                if m.step > args.warmup] for k in ("data_wait_s", "step_time")}
                    wait = sum(m.value for m in hist["data_wait_s"]) / len(hist["data_wait_s"])
                    step = sum(m.value for m in hist["step_time"]) / len(hist["step_time"])
                    rows.append({"round": r, "source": name, "data_wait_s": wait, "step_s": step,
                                 "ratio": wait / step})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            s3.stop()
    print("\n| round | shards on | data wait per step | step time | wait / step |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['source']} | {row['data_wait_s'] * 1e3:.2f} ms | "
              f"{row['step_s']:.3f} s | {row['ratio'] * 100:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
