"""Ray Tune sweeps over FDRL training configs, with ASHA, MLflow parent/child runs and a registry
hand-off of the best trial.

Each trial runs the same ``run_training`` as a training job (``train_trial``), nested under the
sweep's MLflow run. At the end the results table, CSV and plot go to ``<storage>/<name>/`` and to
the parent run, every trial's MLflow run gets the status the table shows, and the best finished
trial is registered as ``candidate``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

from fdrl.config import TrainConfig, storage_root
from fdrl.data import storage
from fdrl.core.divergences import PAIRINGS
from fdrl.workflows.sweep_report import TrialRow, best_row, collect_rows, trial_id, write_report

# ASHA metrics (all minimised). "kid": domain-feature KID of EMA samples against real data,
# comparable across pairings. "kl": the mean log r on flowed samples, the KL diagnostic, which is
# free but measured by each trial's own ratio estimator, so it is not comparable across pairings.
METRICS = {"kid": "kid", "kl": "log_r_flowed", "fid": "fid"}

DEFAULT_SPACE: dict[str, Any] = {
    "pairing": {"choice": list(PAIRINGS)},
    "eta": {"loguniform": [0.3, 10.0]},
    "flow_steps": {"choice": [10, 20]},
    "nu": {"choice": [0.0, 0.01, 0.03]},
}

STATUS = {"finished": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}


@dataclasses.dataclass
class SweepResult:
    rows: list[TrialRow]
    folder: str  # results.md, results.csv, results.png (a folder or an object-store URI)
    best: Optional[TrialRow]
    model_uri: Optional[str]


def train_trial(config: dict, run_name: str, callbacks: list,
                train_loop: Optional[Callable] = None) -> None:
    """One trial: a training run of ``config`` named ``run_name``, reporting to ``callbacks``."""
    from fdrl.workflows.train import check_run, resolve, run_training

    cfg = dataclasses.replace(TrainConfig.from_dict(config), run_name=run_name)
    run_training(check_run(resolve(cfg)), callbacks=callbacks, train_loop=train_loop)


def trial_base_config(base: TrainConfig, sweep_dir: str, parent_run_id: str) -> TrainConfig:
    """The config every trial starts from: a copy of ``base`` with the sweep's own settings."""
    from fdrl.distributed.tune import TRIAL_DRIVER_CPU

    return dataclasses.replace(
        base,
        mlflow_parent_run_id=parent_run_id,
        # A trial that loses a worker is retried from its checkpoint; one that diverges fails at
        # once (the trainer's failure policy), so the sweep keeps the user's --max-failures.
        # Each trial driver holds TRIAL_DRIVER_CPU; a worker reserving a whole CPU would then never
        # fit beside it, and the second of two trials on 2 CPUs would wait for the first to finish.
        worker_cpus=base.worker_cpus or base.threads - 2 * TRIAL_DRIVER_CPU,
        register=False,  # only the best trial is registered, by the sweep
        storage=storage.join(sweep_dir, "trials"),
    )


def prepare_base(base: TrainConfig, metric: str, root: str) -> TrainConfig:
    """What every trial shares, prepared once before trials hold the CPUs: the prior, the
    feature classifier (``kid``) or the FID reference (``fid``)."""
    from fdrl.data.manifest import manifest_hash, open_shard_set
    from fdrl.tracking.backend import default_tracking_uri
    from fdrl.workflows.priors import FITTED_PRIORS, ensure_prior, prior_cache_path

    shard_set = open_shard_set(base.data)
    base = dataclasses.replace(base, tracking_uri=base.tracking_uri or default_tracking_uri(),
                               data=str(shard_set.root), storage=root)
    if not base.prior_path and base.prior in FITTED_PRIORS:
        path = prior_cache_path(base.prior, base.prior_rank, shard_set, root)
        base = dataclasses.replace(base, prior_path=ensure_prior(
            base.prior, base.prior_rank, base.seed, shard_set, path))
    if metric == "kid":
        from fdrl.eval.evaluation import ensure_classifier

        base = dataclasses.replace(
            base, eval_every=base.eval_every or base.log_every,
            eval_classifier=base.eval_classifier or ensure_classifier(
                base.data, root, manifest_hash(base.data)))
    if metric == "fid":
        from fdrl.workflows.train import ensure_fid_reference

        base = dataclasses.replace(base, fid=True, fid_every=base.fid_every or base.log_every)
        base = dataclasses.replace(base, fid_reference=ensure_fid_reference(base))
    return base


def run_sweep(base: TrainConfig, spec: dict[str, Any], *, num_samples: int, metric: str = "kid",
              max_concurrent: int = 2, grace_period: int = 0, extra_trials: list[dict] = (),
              name: str = "sweep", resume: bool = False, register_name: str = "",
              train_loop: Optional[Callable] = None) -> SweepResult:
    """Run the sweep; writes results.csv/.md and the plot into <storage>/<name>/."""
    from functools import partial

    from fdrl.distributed.cluster import connect
    from fdrl.distributed.tune import build_tuner, trial_function
    from fdrl.tracking.tracker import Tracker

    if metric not in METRICS:
        raise ValueError(f"unknown sweep metric {metric!r}; valid: {', '.join(METRICS)}")
    metric_key = METRICS[metric]
    root = storage_root(base)
    sweep_dir = storage.join(root, name)
    storage.check_writable(sweep_dir)
    connect()
    base = prepare_base(base, metric, root)

    info_path = storage.join(sweep_dir, "sweep.json")
    previous = json.loads(storage.read_text(info_path)) if resume and storage.is_file(info_path) else {}
    parent = Tracker(base.experiment, run_name=name, tracking_uri=base.tracking_uri,
                     run_id=previous.get("mlflow_run_id") or None)
    if not previous:
        parent.log_params({"sweep.space": json.dumps(spec), "sweep.num_samples": num_samples,
                           "sweep.metric": metric, "sweep.extra_trials": json.dumps(list(extra_trials)),
                           **{f"base.{k}": v for k, v in base.to_dict().items()}})
        parent.set_tags({"fdrl.kind": "sweep", "dataset": base.dataset})
    storage.write_text(info_path, json.dumps({"mlflow_run_id": parent.run_id or ""}))

    trial_base = trial_base_config(base, sweep_dir, parent.run_id or "")
    trial = trial_function(partial(train_trial, train_loop=train_loop))
    tuner = build_tuner(trial, trial_base.to_dict(), spec, sweep_dir, num_samples=num_samples,
                        metric_key=metric_key, max_steps=base.steps, max_concurrent=max_concurrent,
                        grace_period=grace_period, extra_trials=list(extra_trials), resume=resume)
    grid = tuner.fit()

    searched = list(spec)
    rows = collect_rows(grid, metric_key, trial_base.storage, searched)
    _close_trial_runs(rows, base.tracking_uri)
    with storage.staged_dir(sweep_dir) as out:
        for artifact in write_report(rows, metric_key, searched, out):
            parent.log_artifact(artifact)
    best, model_uri = best_row(rows), None
    if best is not None:
        parent.set_tags({"best_trial": best.trial, "best_mlflow_run_id": best.mlflow_run_id})
        parent.log_metrics({f"best_{metric_key}": best.metric}, 0)
        model_uri = _register_best(best, trial_base, grid, register_name)
    parent.end("FINISHED")
    return SweepResult(rows, sweep_dir, best, model_uri)


def _close_trial_runs(rows: list[TrialRow], tracking_uri: str) -> None:
    """Tune ends a trial by stopping its process whenever ASHA says stop, also at max_t, so a
    trial's MLflow run is left RUNNING or marked FAILED by the interrupted trainer. Give it the
    status the results table shows."""
    from fdrl.tracking.runs import set_status

    for row in rows:
        if row.mlflow_run_id:
            tags = {"fdrl.stopped_by": "ASHA"} if row.status == "stopped early" else {}
            set_status(tracking_uri, row.mlflow_run_id, STATUS[row.status], tags)


def _register_best(best: TrialRow, base: TrainConfig, grid, register_name: str) -> str:
    from fdrl.tracking.registry import log_fdrl_model

    trial_cfg = next(r.config for r in grid if trial_id(r) == best.trial)
    name = register_name or f"fdrl-{base.dataset}"
    version = log_fdrl_model(best.mlflow_run_id, best.checkpoint, base.prior_path or None,
                             trial_cfg, name, base.tracking_uri, aliases=("candidate",))
    print(f"best trial {best.trial} registered as models:/{name}@candidate (version {version.version})")
    return f"models:/{name}@candidate"
