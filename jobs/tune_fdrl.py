"""Sweep FDRL with Ray Tune over the pairing, eta (log scale), K and nu, with ASHA early stopping.

Each trial trains with its own TorchTrainer workers, as a training job does. MLflow gets a parent
run for the sweep and one child run per trial. At the end, results.csv / results.md / results.png
are written under <storage>/<name>/ and logged to the parent, and the best trial's model is
registered with alias `candidate`. With no --data, the sweep runs on MNIST-5k (built if missing).

    python jobs/tune_fdrl.py --num-samples 8 --steps 60
    python jobs/tune_fdrl.py --search lr=loguniform:1e-4,1e-3 --extra-trial pairing=lr-kl,lr=10
    python jobs/tune_fdrl.py --space sweep.yaml --resume --name sweep-1

A search-space YAML maps training fields to {choice: [...]}, {loguniform: [a, b]},
{uniform: [a, b]}, {grid: [...]} or a constant; it replaces the default space.
"""


import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from fdrl.config import add_config_args, config_from_args
from fdrl.data import storage
from fdrl.workflows.sweep import DEFAULT_SPACE, METRICS, run_sweep

from fdrl.presets import MNIST, mnist_data

# Sweep-sized trials: short, one CPU worker each so two trials run at once on 2 cores.
BASE = replace(MNIST, steps=60, workers=1, batch=32, log_every=10, checkpoint_every=10**9,
               sample_every=10**9, grid_size=16, keep_checkpoints=1,
               fid=False)  # --metric fid turns it on, every --log-every steps


def _parse_kv(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _parse_search(items: list[str]) -> dict:
    """name=kind:a,b,c -> {name: {kind: [a, b, c]}}"""
    space = {}
    for item in items:
        name, _, rest = item.partition("=")
        kind, _, args = rest.partition(":")
        space[name.replace("-", "_")] = {kind: [yaml.safe_load(a) for a in args.split(",")]}
    return space


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("sweep")
    g.add_argument("--num-samples", type=int, default=8, help="number of trials drawn from the space")
    g.add_argument("--metric", choices=list(METRICS), default="kid",
                   help="ASHA metric: kid (domain-feature KID, default), fid (standard FID-N of "
                        "--fid-samples EMA samples, any dataset) or kl (the KL diagnostic)")
    g.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    g.add_argument("--grace-period", type=int, default=0, help="ASHA grace period in steps (0: steps/4)")
    g.add_argument("--space", type=Path, help="YAML search space (replaces the default space)")
    g.add_argument("--search", action="append", default=[], metavar="FIELD=KIND:A,B",
                   help="add or replace one dimension, e.g. lr=loguniform:1e-4,1e-3")
    g.add_argument("--extra-trial", action="append", default=[], metavar="K=V,K=V",
                   help="a fixed trial evaluated first, e.g. pairing=lr-kl,lr=10")
    g.add_argument("--name", default="sweep", help="sweep name: directory under --storage, MLflow parent run")
    add_config_args(p, BASE)
    args = p.parse_args(argv)

    base = config_from_args(args, BASE)
    if not base.data:
        base.data = str(mnist_data())
    spec = yaml.safe_load(args.space.read_text()) if args.space else dict(DEFAULT_SPACE)
    spec.update(_parse_search(args.search))
    try:
        result = run_sweep(base, spec, num_samples=args.num_samples, metric=args.metric,
                           max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                           extra_trials=[_parse_kv(t) for t in args.extra_trial], name=args.name,
                           resume=base.resume, register_name=base.register_name)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    out = result.folder
    print(storage.read_text(storage.join(out, "results.md")))
    failed = sum(r.status == "failed" for r in result.rows)
    print(f"results: {out}/results.csv, {out}/results.png; {failed} failed; best: "
          f"{result.model_uri or 'none registered'}")


if __name__ == "__main__":
    main()
