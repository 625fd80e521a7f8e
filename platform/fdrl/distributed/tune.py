"""Ray Tune glue for sweeps: the search space, the Tuner with ASHA, and the trial function.

Each trial is a Tune function that runs a whole training run (its own TorchTrainer and workers);
rank 0's reports reach Tune through ``TuneReportCallback`` (the Train V2 pattern). The trial
driver itself asks for 0.01 CPU on the head node, so concurrent trials never hold the CPUs their
workers need, and losing a worker node never loses a trial driver.
What a trial trains, and what the sweep does with the results, is ``fdrl.workflows.sweep``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ray import tune

from fdrl.config import TrainConfig

TRIAL_DRIVER_CPU = 0.01  # a trial's own process only waits on its TorchTrainer
# Trial drivers live on the head node, which a sweep cannot lose: a lost worker node then costs a
# trial's workers only, which its trainer restarts from their checkpoint (distributed.trainer).
HEAD_NODE = "node:__internal_head__"


def to_tune_space(spec: dict[str, Any]) -> dict[str, Any]:
    """{"field": {"choice": [...]} | {"loguniform": [a, b]} | {"uniform": [a, b]} |
    {"grid": [...]} | constant} -> a Tune param space. Fields must be TrainConfig fields."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    makers = {"choice": tune.choice, "grid": tune.grid_search,
              "loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a)}
    space = {}
    for name, value in spec.items():
        if name not in fields:
            raise ValueError(f"unknown training field {name!r} in the search space")
        if isinstance(value, dict):
            (kind, args), = value.items()
            if kind not in makers:
                raise ValueError(f"{name}: unknown distribution {kind!r}; valid: {', '.join(makers)}")
            space[name] = makers[kind](args)
        else:
            space[name] = value
    return space


def trial_function(train: Callable[[dict, str, list], None]) -> Callable[[dict], None]:
    """The Tune function of a trial: ``train(config, run name, Ray Train callbacks)`` with the
    trial's own run name and Tune's report callback."""

    def run_trial(config: dict) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        train(config, f"trial-{tune.get_context().get_trial_id()}", [TuneReportCallback()])

    return run_trial


def build_tuner(trial: Callable[[dict], None], base: dict, spec: dict[str, Any], sweep_dir: str, *,
                num_samples: int, metric_key: str, max_steps: int, max_concurrent: int,
                grace_period: int, extra_trials: list[dict], resume: bool) -> tune.Tuner:
    """A Tuner over ``trial`` (restored from ``sweep_dir/tune`` with ``resume``); ``sweep_dir``
    is a folder or an object-store URI, which Tune writes to itself."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    param_space = {**base, **to_tune_space(spec)}
    trainable = tune.with_resources(trial, {"cpu": TRIAL_DRIVER_CPU, HEAD_NODE: 0.001})
    tune_path = f"{sweep_dir.rstrip('/')}/tune"
    if resume and tune.Tuner.can_restore(tune_path):
        return tune.Tuner.restore(tune_path, trainable=trainable, param_space=param_space)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            # Tune counts the fixed points within num_samples; ours come on top of the draws.
            metric=metric_key, mode="min", num_samples=num_samples + len(extra_trials),
            scheduler=ASHAScheduler(time_attr="step", max_t=max_steps, reduction_factor=2,
                                    grace_period=grace_period or max(max_steps // 4, 1)),
            # The limit belongs to the generator: Tune ignores max_concurrent_trials when a
            # search algorithm is passed in, and would start every trial at once.
            search_alg=BasicVariantGenerator(points_to_evaluate=list(extra_trials) or None,
                                             max_concurrent=max_concurrent)),
        run_config=tune.RunConfig(name="tune", storage_path=sweep_dir))
