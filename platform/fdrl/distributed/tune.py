"""Ray Tune sweeps over FDRL training configs, with ASHA, MLflow parent/child runs and a registry
hand-off of the best trial.

Each trial is a Tune function that runs the same ``run_training`` as a training job: a
TorchTrainer with its own workers, whose rank-0 reports reach Tune through
``TuneReportCallback`` (the Train V2 pattern). The trial driver itself asks for 0.01 CPU, so
concurrent trials never hold the CPUs their workers need.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fdrl.config import TrainConfig, storage_root
from fdrl.distributed.sweep_report import (TrialRow, best_row, close_trial_runs, collect_rows,
                                          register_best, write_report)
from fdrl.core.divergences import PAIRINGS

# ASHA metrics (all minimised). "kid": domain-feature KID of EMA samples against real data,
# comparable across pairings. "kl": the mean log r on flowed samples, the KL diagnostic, which is
# free but measured by each trial's own ratio estimator, so it is not comparable across pairings.
METRICS = {"kid": "kid", "kl": "log_r_flowed", "fid": "fid"}

TRIAL_DRIVER_CPU = 0.01  # a trial's own process only waits on its TorchTrainer

DEFAULT_SPACE: dict[str, Any] = {
    "pairing": {"choice": list(PAIRINGS)},
    "eta": {"loguniform": [0.3, 10.0]},
    "flow_steps": {"choice": [10, 20]},
    "nu": {"choice": [0.0, 0.01, 0.03]},
}


def to_tune_space(spec: dict[str, Any]) -> dict[str, Any]:
    """{"field": {"choice": [...]} | {"loguniform": [a, b]} | {"uniform": [a, b]} |
    {"grid": [...]} | constant} -> a Tune param space. Fields must be TrainConfig fields."""
    from ray import tune

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    space = {}
    for name, value in spec.items():
        if name not in fields:
            raise ValueError(f"unknown training field {name!r} in the search space")
        if isinstance(value, dict):
            (kind, args), = value.items()
            makers = {"choice": tune.choice, "grid": tune.grid_search,
                      "loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a)}
            if kind not in makers:
                raise ValueError(f"{name}: unknown distribution {kind!r}; valid: {', '.join(makers)}")
            space[name] = makers[kind](args)
        else:
            space[name] = value
    return space


def run_trial(config: dict) -> None:
    """One trial: the training entry point, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from fdrl.distributed.launch import run_training

    cfg = TrainConfig.from_dict(config)
    cfg.run_name = f"trial-{tune.get_context().get_trial_id()}"
    run_training(cfg, callbacks=[TuneReportCallback()])


def trial_base_config(base: TrainConfig, sweep_dir: Path, parent_run_id: str) -> TrainConfig:
    """The config every trial starts from: a copy of ``base`` with the sweep's own settings."""
    return dataclasses.replace(
        base,
        mlflow_parent_run_id=parent_run_id,
        max_failures=0,  # a diverging trial diverges again: fail it, don't retry it
        # Each trial driver holds TRIAL_DRIVER_CPU; a worker reserving a whole CPU would then never
        # fit beside it, and the second of two trials on 2 CPUs would wait for the first to finish.
        worker_cpus=base.worker_cpus or base.threads - 2 * TRIAL_DRIVER_CPU,
        register=False,  # only the best trial is registered, by the sweep
        storage=str(sweep_dir / "trials"),
    )


def build_tuner(base: TrainConfig, spec: dict[str, Any], sweep_dir: Path, *, num_samples: int,
                metric_key: str, max_concurrent: int, grace_period: int, extra_trials: list[dict],
                resume: bool):
    """A Tuner over ``run_trial`` (restored from ``sweep_dir/tune`` with ``resume``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    param_space = {**base.to_dict(), **to_tune_space(spec)}
    trainable = tune.with_resources(run_trial, {"cpu": TRIAL_DRIVER_CPU})
    tune_path = sweep_dir / "tune"
    if resume and tune.Tuner.can_restore(str(tune_path)):
        return tune.Tuner.restore(str(tune_path), trainable=trainable, param_space=param_space)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            # Tune counts the fixed points within num_samples; ours come on top of the draws.
            metric=metric_key, mode="min", num_samples=num_samples + len(extra_trials),
            scheduler=ASHAScheduler(time_attr="step", max_t=base.steps, reduction_factor=2,
                                    grace_period=grace_period or max(base.steps // 4, 1)),
            # The limit belongs to the generator: Tune ignores max_concurrent_trials when a
            # search algorithm is passed in, and would start every trial at once.
            search_alg=BasicVariantGenerator(points_to_evaluate=list(extra_trials) or None,
                                             max_concurrent=max_concurrent)),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir)))


def run_sweep(base: TrainConfig, spec: dict[str, Any], *, num_samples: int, metric: str = "kid",
              max_concurrent: int = 2, grace_period: int = 0, extra_trials: list[dict] = (),
              name: str = "sweep", resume: bool = False, register_name: str = "") -> list[TrialRow]:
    """Run the sweep; writes results.csv/.md and the plot into <storage>/<name>/ and returns rows."""
    import ray

    from fdrl.data.manifest import manifest_hash, open_shard_set
    from fdrl.distributed.launch import ensure_prior
    from fdrl.tracking.tracker import Tracker, default_tracking_uri

    if metric not in METRICS:
        raise ValueError(f"unknown sweep metric {metric!r}; valid: {', '.join(METRICS)}")
    metric_key = METRICS[metric]
    shard_set = open_shard_set(base.data)
    storage = storage_root(base)
    sweep_dir = storage / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init()
    base = dataclasses.replace(base, tracking_uri=base.tracking_uri or default_tracking_uri(),
                               data=str(Path(base.data).resolve()))
    base = dataclasses.replace(base, prior_path=ensure_prior(base, shard_set, storage))
    if metric == "kid":
        from fdrl.eval.evaluation import ensure_classifier

        base = dataclasses.replace(
            base, eval_every=base.eval_every or base.log_every,
            eval_classifier=base.eval_classifier or ensure_classifier(
                base.data, storage, manifest_hash(base.data)))

    if metric == "fid":  # the reference once, here, before trials hold the CPUs
        from fdrl.distributed.launch import ensure_fid_reference

        base = dataclasses.replace(base, fid=True, fid_every=base.fid_every or base.log_every,
                                   storage=str(storage))
        base = dataclasses.replace(base, fid_reference=ensure_fid_reference(base))

    info_path = sweep_dir / "sweep.json"
    previous = json.loads(info_path.read_text()) if resume and info_path.exists() else {}
    parent = Tracker(base.experiment, run_name=name, tracking_uri=base.tracking_uri,
                     run_id=previous.get("mlflow_run_id"))
    if not previous:
        parent.log_params({"sweep.space": json.dumps(spec), "sweep.num_samples": num_samples,
                           "sweep.metric": metric, "sweep.extra_trials": json.dumps(list(extra_trials)),
                           **{f"base.{k}": v for k, v in base.to_dict().items()}})
        parent.set_tags({"fdrl.kind": "sweep", "dataset": base.dataset})
    info_path.write_text(json.dumps({"mlflow_run_id": parent.run_id or ""}))

    trial_base = trial_base_config(base, sweep_dir, parent.run_id or "")
    tuner = build_tuner(trial_base, spec, sweep_dir, num_samples=num_samples,
                        metric_key=metric_key, max_concurrent=max_concurrent,
                        grace_period=grace_period, extra_trials=list(extra_trials), resume=resume)
    grid = tuner.fit()

    searched = list(spec)
    rows = collect_rows(grid, metric_key, Path(trial_base.storage), searched)
    close_trial_runs(rows, base.tracking_uri)
    for artifact in write_report(rows, metric_key, searched, sweep_dir):
        parent.log_artifact(artifact)
    best = best_row(rows)
    if best is not None:
        parent.set_tags({"best_trial": best.trial, "best_mlflow_run_id": best.mlflow_run_id})
        parent.log_metrics({f"best_{metric_key}": best.metric}, 0)
        register_best(best, trial_base, grid, register_name)
    parent.end("FINISHED")
    return rows
