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
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fdrl.config import TrainConfig
from fdrl.core.divergences import PAIRINGS

# ASHA metrics (all minimised). "kid": domain-feature KID of EMA samples against real data,
# comparable across pairings. "kl": the mean log r on flowed samples, the KL diagnostic, which is
# free but measured by each trial's own ratio estimator, so it is not comparable across pairings.
METRICS = {"kid": "kid", "kl": "log_r_flowed"}

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


@dataclass
class TrialRow:
    trial: str
    status: str  # finished, stopped early (ASHA), failed
    params: dict
    step: int
    metric: float
    error: str
    mlflow_run_id: str
    checkpoint: str


def _trial_id(result) -> str:
    """Tune names a trial directory <trainable>_<id>_<n>_<params>...; ids look like 'ab12c_00003'."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})(_|$)", Path(result.path or "").name)
    return (result.metrics or {}).get("trial_id") or (found.group(1) if found else "?")


def collect_rows(grid, metric_key: str, storage: Path, searched: list[str]) -> list[TrialRow]:
    rows = []
    for result in grid:
        cfg = result.config or {}
        trial_id = _trial_id(result)
        metrics = result.metrics or {}
        info_path = storage / f"trial-{trial_id}" / "fdrl_run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        error = ""
        if result.error is not None:
            error = _short_error(result.error)
            status = "failed"
        elif metrics.get("step", 0) < cfg.get("steps", 0):
            status = "stopped early"
        else:
            status = "finished"
        value = metrics.get(metric_key, math.nan) if not error else math.nan
        rows.append(TrialRow(trial_id, status, {k: cfg.get(k) for k in searched},
                             int(metrics.get("step", 0)), float(value), error,
                             info.get("mlflow_run_id", ""), metrics.get("checkpoint_path", "")))
    return rows


def _short_error(err: BaseException) -> str:
    """The innermost useful line: e.g. 'NonFiniteLossError: non-finite loss at step 3: ...'."""
    text = str(err)
    for line in reversed(text.splitlines()):
        if "Error" in line and ":" in line:
            return line.strip()[:300]
    return (text.splitlines() or [type(err).__name__])[-1][:300]


def rows_to_markdown(rows: list[TrialRow], metric: str, searched: list[str]) -> str:
    head = ["trial", "status", *searched, "step", metric, "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (math.isnan(r.metric), r.metric)):
        vals = [_fmt(r.params[k]) for k in searched]
        lines.append("| " + " | ".join([r.trial, r.status, *vals, str(r.step), _fmt(r.metric), r.error]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def plot_rows(rows: list[TrialRow], metric: str, path: Path) -> Path:
    """One column per pairing; the metric against eta (top) and against K (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairings = sorted({r.params.get("pairing") for r in rows if r.params.get("pairing")}) or ["all"]
    fig, axes = plt.subplots(2, len(pairings), figsize=(3.2 * len(pairings), 5.5), squeeze=False,
                             sharey=True)
    finite = [r.metric for r in rows if not math.isnan(r.metric)]
    floor = min(finite, default=0.0)  # failed trials are drawn as crosses on this level
    for col, pairing in enumerate(pairings):
        mine = [r for r in rows if pairing == "all" or r.params.get("pairing") == pairing]
        for row, (field, scale) in enumerate((("eta", "log"), ("flow_steps", "linear"))):
            ax = axes[row][col]
            ok = [r for r in mine if not math.isnan(r.metric) and r.params.get(field) is not None]
            bad = [r for r in mine if math.isnan(r.metric) and r.params.get(field) is not None]
            ax.scatter([r.params[field] for r in ok], [r.metric for r in ok], c="tab:blue", label="trial")
            if bad:
                ax.scatter([r.params[field] for r in bad], [floor] * len(bad), marker="x", c="tab:red",
                           label="failed (no metric)")
            ax.set_xscale(scale)
            ax.set_xlabel("eta" if field == "eta" else "K (flow steps)")
            ax.set_ylabel(metric)
            if row == 0:
                ax.set_title(pairing)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sweep(base: TrainConfig, spec: dict[str, Any], *, num_samples: int, metric: str = "kid",
              max_concurrent: int = 2, grace_period: int = 0, extra_trials: list[dict] = (),
              name: str = "sweep", resume: bool = False, register_name: str = "") -> list[TrialRow]:
    """Run the sweep; writes results.csv/.md and the plot into <storage>/<name>/ and returns rows."""
    import csv

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from fdrl.data.manifest import open_shard_set
    from fdrl.distributed.launch import ensure_prior
    from fdrl.tracking.tracker import Tracker, default_tracking_uri

    if metric not in METRICS:
        raise ValueError(f"unknown sweep metric {metric!r}; valid: {', '.join(METRICS)}")
    metric_key = METRICS[metric]
    base = dataclasses.replace(base)
    base.tracking_uri = base.tracking_uri or default_tracking_uri()
    shard_set = open_shard_set(base.data)
    base.data = str(Path(base.data).resolve())
    sweep_dir = Path(base.storage).resolve() / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init()
    base.prior_path = ensure_prior(base, shard_set, Path(base.storage).resolve())

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

    base.mlflow_parent_run_id = parent.run_id or ""
    base.max_failures = 0  # a diverging trial diverges again: fail it, don't retry it
    # Each trial driver holds TRIAL_DRIVER_CPU; a worker reserving a whole CPU would then never
    # fit beside it, and the second of two trials on 2 CPUs would wait for the first to finish.
    base.worker_cpus = base.worker_cpus or base.threads - 2 * TRIAL_DRIVER_CPU
    base.register = False  # only the best trial is registered, below
    base.storage = str(sweep_dir / "trials")
    if metric == "kid":
        from fdrl.eval.evaluation import ensure_classifier
        from fdrl.data.manifest import manifest_hash

        base.eval_every = base.eval_every or base.log_every
        base.eval_classifier = base.eval_classifier or ensure_classifier(
            base.data, sweep_dir.parent, manifest_hash(base.data))
    param_space = {**base.to_dict(), **to_tune_space(spec)}
    trainable = tune.with_resources(run_trial, {"cpu": TRIAL_DRIVER_CPU})
    tune_path = sweep_dir / "tune"
    if resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, param_space=param_space)
    else:
        tuner = tune.Tuner(
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
    grid = tuner.fit()

    searched = list(spec)
    rows = collect_rows(grid, metric_key, Path(base.storage), searched)
    _close_trial_runs(rows, base.tracking_uri)
    table = rows_to_markdown(rows, metric_key, searched)
    (sweep_dir / "results.md").write_text(table + "\n")
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "status", *searched, "step", metric_key, "error", "mlflow_run_id"])
        for r in rows:
            writer.writerow([r.trial, r.status, *(r.params[k] for k in searched), r.step, r.metric,
                             r.error, r.mlflow_run_id])
    plot_rows(rows, metric_key, sweep_dir / "results.png")
    for artifact in ("results.md", "results.csv", "results.png"):
        parent.log_artifact(sweep_dir / artifact)

    done = [r for r in rows if r.status == "finished" and not math.isnan(r.metric) and r.checkpoint]
    if done:
        best = min(done, key=lambda r: r.metric)
        parent.set_tags({"best_trial": best.trial, "best_mlflow_run_id": best.mlflow_run_id})
        parent.log_metrics({f"best_{metric_key}": best.metric}, 0)
        _register_best(best, base, grid, register_name)
    parent.end("FINISHED")
    return rows


def _close_trial_runs(rows: list[TrialRow], tracking_uri: str) -> None:
    """Tune ends a trial by stopping its process whenever ASHA says stop, also at max_t, so a
    trial's MLflow run is left RUNNING or marked FAILED by the interrupted trainer. Give it the
    status the results table shows."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    final = {"finished": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}
    for row in rows:
        if row.mlflow_run_id and client.get_run(row.mlflow_run_id).info.status != final[row.status]:
            if row.status == "stopped early":
                client.set_tag(row.mlflow_run_id, "fdrl.stopped_by", "ASHA")
            client.set_terminated(row.mlflow_run_id, final[row.status])


def _register_best(best: TrialRow, base: TrainConfig, grid, register_name: str) -> None:
    from fdrl.tracking.registry import log_fdrl_model

    trial_cfg = next(r.config for r in grid if _trial_id(r) == best.trial)
    name = register_name or f"fdrl-{base.dataset}"
    version = log_fdrl_model(best.mlflow_run_id, best.checkpoint, base.prior_path or None,
                             trial_cfg, name, base.tracking_uri, aliases=("candidate",))
    print(f"best trial {best.trial} registered as models:/{name}@candidate (version {version.version})")
