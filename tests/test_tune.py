"""A real 3-trial sweep on a local Ray: two TorchTrainer trials at once on 2 CPUs, one diverging."""

import json

import pytest
from mlflow.tracking import MlflowClient

from fdrl.config import TrainConfig

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, hooks):
    import ray

    from fdrl.data.writer import convert
    from fdrl.workflows.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    shards = tmp / "shards"
    convert("mnist", None, shards, shard_size=64, limit=256, progress=False)
    # Each trial's rank 0 marks its loop start in tmp/markers, waits until two trials have started
    # (a barrier: trials that could not run together time out and fail), and at its last step
    # records the starts it saw (tests/train_hooks.py).
    base = TrainConfig(data=str(shards), dataset="mnist", arch="mnist32", prior="full", steps=20,
                       batch=8, workers=1, flow_steps=2, extra_steps=1, log_every=10,
                       checkpoint_every=10**9, sample_every=10**9, grid_size=4,
                       storage=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    space = {"pairing": {"choice": ["lr-kl"]}, "eta": {"loguniform": [1.0, 3.0]}}
    ray.init(num_cpus=2)  # with the dashboard: Train's placement-group cleaner needs its State API
    try:
        # Fixed trials run first, in order: the two sound ones start together (so they must share
        # the 2 CPUs), the diverging one takes the first free slot. grace_period = steps: ASHA
        # stops nothing, so every trial's outcome is deterministic.
        trials = [{"pairing": "lr-kl", "eta": 1.5}, {"pairing": "lr-kl", "eta": 2.5},
                  {"pairing": "lr-kl", "eta": 2.0, "lr": 1000.0}]
        result = run_sweep(base, space, num_samples=0, metric="kl", max_concurrent=2,
                           grace_period=20, extra_trials=trials, name="s", register_name="swept",
                           train_loop=hooks.overlap_markers(str(tmp / "markers"), 2))
    finally:
        ray.shutdown()
    assert result.folder == str(tmp / "runs" / "s")
    return result.rows, tmp


def test_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(sweep):
    rows, tmp = sweep
    assert sorted(r.status for r in rows) == ["failed", "finished", "finished"]
    failed = next(r for r in rows if r.status == "failed")
    assert "non-finite loss" in failed.error
    for name in ("results.csv", "results.md", "results.png"):
        assert (tmp / "runs" / "s" / name).stat().st_size > 0
    assert "non-finite loss" in (tmp / "runs" / "s" / "results.md").read_text()


def test_parent_and_child_runs_are_linked(sweep):
    rows, tmp = sweep
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    parent = client.search_runs(client.get_experiment_by_name("fdrl").experiment_id,
                                filter_string="tags.`fdrl.kind` = 'sweep'")[0]
    children = client.search_runs(parent.info.experiment_id,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children} == {r.mlflow_run_id for r in rows}
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED"]
    assert all(c.data.tags.get("pairing") == "lr-kl" and "eta" in c.data.tags for c in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "results.md", "results.png"}


def test_two_sound_trials_trained_concurrently(sweep):
    # Each finished trial saw the other's start marker before its own last step: both were in
    # their training loops at once. Without room for both, the first would time out waiting.
    rows, tmp = sweep
    finished = [r for r in rows if r.status == "finished"]
    names = {f"trial-{r.trial}" for r in finished}
    for r in finished:
        seen = set(json.loads((tmp / "markers" / f"trial-{r.trial}.finished").read_text()))
        assert names <= seen, f"trial-{r.trial} finished having seen only {sorted(seen)}"


def test_best_trial_is_registered_as_candidate(sweep):
    rows, tmp = sweep
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    version = client.get_model_version_by_alias("swept", "candidate")
    best = min((r for r in rows if r.status == "finished"), key=lambda r: r.metric)
    assert version.run_id == best.mlflow_run_id
