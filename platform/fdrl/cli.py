"""The one entry point behind every training job in jobs/: preset -> flags -> run_training.

Works as ``python jobs/X.py`` (starts a local Ray) and under ``ray job submit`` (connects to
the cluster the job runs on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

from fdrl.config import TrainConfig, add_config_args, config_from_args


def parse_train_args(preset: TrainConfig, description: str, argv=None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, preset)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    return config_from_args(args), args.dry_run


def train_main(preset: TrainConfig, description: str, argv=None,
               default_data: Optional[Callable[[], Path]] = None) -> int:
    cfg, dry_run = parse_train_args(preset, description, argv)
    if not cfg.data and default_data is not None:
        cfg.data = str(default_data())
    if not cfg.data:
        sys.exit("error: --data PATH is required (a shard directory made by datasets/prepare.py)")
    try:
        cfg.validate()
    except ValueError as err:
        sys.exit(f"error: {err}")
    if dry_run:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0

    from fdrl.distributed.launch import run_training
    from fdrl.tracking.tracker import default_tracking_uri

    try:
        result = run_training(cfg)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    run_dir = result.fdrl_run_dir
    grids = sorted((run_dir / "samples").glob("*.png"))
    print("\n== done ==")
    print(f"wall time (training):  {result.fdrl_wall_seconds:.1f} s")
    print(f"MLflow tracking URI:   {cfg.tracking_uri or default_tracking_uri()}")
    print(f"MLflow run:            {result.fdrl_config.mlflow_run_id}")
    print(f"final sample grid:     {grids[-1] if grids else 'none'}")
    print(f"final checkpoint:      {result.checkpoint.path if result.checkpoint else 'none'}")
    print(f"registered model:      {getattr(result, 'fdrl_model_uri', None) or 'none'}")
    uri = cfg.tracking_uri or default_tracking_uri()
    print(f"open the MLflow UI:    mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return 0
