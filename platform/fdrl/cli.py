"""The one entry point behind every training job in jobs/: preset -> flags -> resolved, checked
run -> ``fdrl.workflows.train.run_training``.

Works as ``python jobs/X.py`` (starts a local Ray) and under ``ray job submit`` (connects to
the cluster the job runs on). A configuration error, and a run that fails for a reason that would
repeat, end in one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

from fdrl.config import TrainConfig, add_config_args, config_from_args


def parse_train_args(preset: TrainConfig, description: str, argv=None,
                     extend: Optional[Callable[[argparse.ArgumentParser], None]] = None
                     ) -> tuple[TrainConfig, bool]:
    """The flags of every TrainConfig field over ``preset``, plus --dry-run; ``extend`` adds a
    job's own flags (which must map onto config fields, e.g. an alias with ``dest``)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, preset)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved run (config, paths, run name, prior) and exit")
    if extend is not None:
        extend(parser)
    args = parser.parse_args(argv)
    return config_from_args(args, preset), args.dry_run


def train_main(preset: TrainConfig, description: str, argv=None,
               default_data: Optional[Callable[[], Path]] = None,
               extend: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               finish: Optional[Callable[[TrainConfig], TrainConfig]] = None) -> int:
    """Parse, resolve and check, train, print where everything went. ``default_data`` builds the
    data when --data is not given; ``finish`` completes the parsed config (e.g. a name)."""
    from fdrl.distributed.trainer import RunFailed
    from fdrl.workflows.train import check_run, resolve, run_training

    cfg, dry_run = parse_train_args(preset, description, argv, extend)
    if not cfg.data and default_data is not None:
        cfg.data = str(default_data())
    try:
        if finish is not None:
            cfg = finish(cfg)
        run = resolve(cfg)
        if dry_run:
            print(json.dumps(run.to_dict(), indent=1))
            return 0
        result = run_training(check_run(run))
    except (OSError, ValueError, RunFailed) as err:  # OSError: storage, tracking server, data
        sys.exit(f"error: {err}")
    grids = result.grids
    print("\n== done ==")
    print(f"wall time (training):  {result.wall_seconds:.1f} s")
    print(f"MLflow tracking URI:   {result.config.tracking_uri}")
    print(f"MLflow run:            {result.mlflow_run_id or 'none (MLflow unreachable)'}")
    print(f"final sample grid:     {grids[-1] if grids else 'none'}")
    print(f"final checkpoint:      {result.checkpoint or 'none'}")
    print(f"registered model:      {result.model_uri or 'none'}")
    uri = result.config.tracking_uri
    print(f"open the MLflow UI:    mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return 0
