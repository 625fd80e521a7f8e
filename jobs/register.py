"""Register a checkpoint in the MLflow model registry by hand, or promote a version.

    # a checkpoint dir (ema.safetensors + meta.json), its prior, into the run that trained it
    python jobs/register.py --checkpoint runs/mnist-X/checkpoint_000003 \\
        --prior runs/priors/abc-full-512.safetensors --name fdrl-mnist --run-id RUN_ID
    # or into a new run of an experiment; --alias defaults to candidate
    python jobs/register.py --checkpoint DIR --prior PATH --name fdrl-mnist --experiment fdrl
    # point champion (or --alias) at version 3
    python jobs/register.py --name fdrl-mnist --promote 3

The config registered with the model is the one in the checkpoint's meta.json. Training jobs
register their final checkpoint themselves (alias candidate).
"""

import os

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--checkpoint", help="checkpoint directory (ema.safetensors, meta.json)")
    p.add_argument("--prior", help="prior .safetensors (not needed for uniform/gaussian priors)")
    p.add_argument("--alias", help="alias to set (default: candidate; with --promote: champion)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--run-id", help="log the model into this MLflow run")
    run.add_argument("--experiment", help="log into a new run of this experiment "
                                          "(default: the checkpoint config's experiment)")
    p.add_argument("--promote", metavar="VERSION", help="set the alias on VERSION and exit")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    args = p.parse_args(argv)

    from fdrl.data.checkpoint import load_meta
    from fdrl.tracking.registry import ModelNotFoundError, log_fdrl_model, promote
    from fdrl.tracking.tracker import Tracker, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    if args.promote:
        try:
            mv = promote(args.name, args.promote, args.alias or "champion", uri)
        except ModelNotFoundError as err:
            sys.exit(f"error: {err}")
        print(f"models:/{args.name}@{args.alias or 'champion'} -> version {mv.version}")
        return 0
    if not args.checkpoint:
        p.error("--checkpoint is required unless --promote is given")
    config = load_meta(args.checkpoint)["config"]
    run_id = args.run_id
    if not run_id:
        tracker = Tracker(args.experiment or config.get("experiment", "fdrl"),
                          run_name=f"register-{args.name}", tracking_uri=uri,
                          tags={"fdrl.registered_from": os.path.abspath(args.checkpoint)})
        if tracker.run_id is None:
            sys.exit(f"error: MLflow at {uri} is unreachable")
        run_id = tracker.run_id
        tracker.end("FINISHED")
    alias = args.alias or "candidate"
    try:
        mv = log_fdrl_model(run_id, args.checkpoint, args.prior, config, args.name, uri, (alias,))
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"registered models:/{args.name}/{mv.version} (run {run_id}) with alias {alias}: "
          f"models:/{args.name}@{alias}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
