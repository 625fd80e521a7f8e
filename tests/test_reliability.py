"""Faults made to happen for real, and what the user sees (docs/reliability.md lists them): a
diverging run, a storage that fills up during a checkpoint, a corrupt latest checkpoint, and an
MLflow server SIGKILLed mid-training (or down at launch). Real processes, a real tmpfs, a real
`mlflow server`; nothing that fails is mocked."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from fdrl.config import TrainConfig

pytestmark = [pytest.mark.timeout(900), pytest.mark.integration]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fdrl.data.writer import convert

    out = tmp_path_factory.mktemp("mnist") / "shards"
    convert("mnist", None, out, shard_size=64, limit=256, progress=False)
    return out


def quiet(tiny, shards, root, **overrides) -> TrainConfig:
    """The tiny config with the parameter-free prior and no grids but the last."""
    return tiny(shards, root, prior="uniform", sample_every=10**9, **overrides)


def _weights(checkpoint: str) -> dict:
    return {**{f"model.{k}": v for k, v in load_file(f"{checkpoint}/model.safetensors").items()},
            **{f"ema.{k}": v for k, v in load_file(f"{checkpoint}/ema.safetensors").items()}}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(ray_cluster, shards, tmp_path_factory, train, tiny):
    root = tmp_path_factory.mktemp("straight")
    return train(quiet(tiny, shards, root, run_name="straight"))


def _wait_for(path: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():  # a condition the run sets, with a deadline
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.05)


def test_a_diverging_run_fails_at_once_with_one_error_line(shards, tmp_path):
    """--lr 1000 through the job's command line: NonFiniteLossError on the first attempt, one
    `error:` line, a non-zero exit, and the MLflow run FAILED with the reason in a tag."""
    env = dict(os.environ, FDRL_HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs/fdrl_mnist.py"), "--data", str(shards), "--lr", "1000",
         "--steps", "5", "--batch", "8", "--flow-steps", "2", "--log-every", "1", "--no-fid",
         "--checkpoint-every", "100", "--run-name", "diverges"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NonFiniteLossError: non-finite loss" in errors[0], proc.stderr[-2000:]
    assert "restarting from the last checkpoint" not in proc.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("fdrl").experiment_id])[0]
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["fdrl.failure"]


def _checkpoint_bytes(tiny) -> int:
    """The size of one checkpoint of the tiny run (weights, EMA, Adam state, manifest)."""
    import tempfile

    from fdrl.core.networks import build_network
    from fdrl.core.step import make_state
    from fdrl.data.checkpoint import save_checkpoint

    state = make_state(build_network("mnist32"), 1e-3)
    for p in state.module.parameters():  # Adam keeps two moments per parameter
        state.optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                    "exp_avg_sq": torch.zeros_like(p)}
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, state, quiet(tiny, Path(d), Path(d)).to_dict(), [{}, {}])
        return sum(f.stat().st_size for f in Path(d).iterdir())


@pytest.fixture
def small_disk(tmp_path, tiny):
    """A tmpfs with room for one checkpoint and a half; remounted larger to free space."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = int(_checkpoint_bytes(tiny) * 1.5) + (1 << 20)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_storage_stops_the_run_and_resume_continues(straight, shards, small_disk, train, tiny):
    """The second checkpoint does not fit: the run stops at once with an error that says the
    storage is full; the first checkpoint stays intact; with space freed, --resume continues from
    it and ends where the straight run ended."""
    from fdrl.data.checkpoint import verify_checkpoint
    from fdrl.distributed.trainer import RunFailed

    root = small_disk
    cfg = quiet(tiny, shards, root, run_name="full", storage=str(root / "runs"),
               tracking_uri=f"sqlite:///{small_disk.parent}/mlflow.db")
    with pytest.raises(RunFailed, match="the storage is full") as err:
        train(cfg)
    assert "after" not in str(err.value)  # not retried
    kept = sorted((root / "runs" / "full").glob("checkpoint_[0-9]*"))
    valid = []
    for c in kept:
        try:
            verify_checkpoint(c)
            valid.append(c)
        except ValueError:
            pass
    assert len(valid) == 1 and json.loads((valid[0] / "meta.json").read_text())["step"] == 2
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = train(quiet(tiny, shards, root, run_name="full", resume=True, storage=str(root / "runs"),
                         tracking_uri=f"sqlite:///{small_disk.parent}/mlflow.db"))
    assert _same(_weights(resumed.checkpoint), _weights(straight.checkpoint))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(straight, shards, tmp_path,
                                                                     train, tiny):
    run = train(quiet(tiny, shards, tmp_path, run_name="corrupt"))
    latest = sorted((tmp_path / "runs" / "corrupt").glob("checkpoint_[0-9]*"))[-1]
    assert json.loads((latest / "meta.json").read_text())["step"] == 4
    weights = latest / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # torn by a crash
    resumed = train(quiet(tiny, shards, tmp_path, run_name="corrupt", resume=True))
    # Restored from step 2 (the step-4 checkpoint cannot load), then trained steps 3 and 4 again.
    assert _same(_weights(resumed.checkpoint), _weights(straight.checkpoint))
    assert run.checkpoint != resumed.checkpoint


def _losses(uri: str, run_id: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in MlflowClient(uri).get_metric_history(run_id, "loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def test_an_mlflow_outage_mid_training_loses_nothing(straight, shards, tmp_path, mlflow_server,
                                                     train, hooks, tiny):
    """The real tracking server is SIGKILLed after step 2 and kept down for more than a minute
    while steps 3 and 4 train; restarted on the same port and database, it holds every step once
    and the model gets registered."""
    marks = tmp_path / "marks"
    outage = {}

    def operator():
        _wait_for(marks / "reached-2-rank0")
        mlflow_server.stop(kill=True)
        outage["start"] = time.monotonic()
        (marks / "go-2").write_text("")
        _wait_for(marks / "reached-4-rank0")
        while time.monotonic() - outage["start"] < 65:  # the outage the issue asks for: > 1 minute
            time.sleep(0.5)
        mlflow_server.start()
        outage["seconds"] = time.monotonic() - outage["start"]
        (marks / "go-4").write_text("")

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    with mlflow_server.credentials():
        result = train(quiet(tiny, shards, tmp_path, run_name="outage", steps=6, experiment="outage",
                            tracking_uri=mlflow_server.uri, register_name="fdrl-outage"),
                       train_loop=hooks.pauses_at({2, 4}, str(marks)))
        thread.join(timeout=600)
        assert outage["seconds"] > 60
        losses = _losses(mlflow_server.uri, result.mlflow_run_id)
        client = MlflowClient(mlflow_server.uri)
        assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
        version = client.get_model_version_by_alias("fdrl-outage", "candidate")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(len(v) == 1 for v in losses.values())
    assert version.run_id == result.mlflow_run_id and result.model_uri == "models:/fdrl-outage@candidate"


def test_a_run_started_while_mlflow_is_down_is_created_when_it_returns(shards, tmp_path,
                                                                       mlflow_server, train, hooks, tiny):
    from fdrl.tracking.runs import TrackingUnreachableError

    marks = tmp_path / "marks"
    mlflow_server.stop(kill=True)
    try:
        with mlflow_server.credentials():
            with pytest.raises(TrackingUnreachableError, match="--tracking-offline"):
                train(quiet(tiny, shards, tmp_path, run_name="offline", tracking_uri=mlflow_server.uri))

            def operator():
                _wait_for(marks / "reached-2-rank0")
                mlflow_server.start()
                (marks / "go-2").write_text("")

            thread = threading.Thread(target=operator, daemon=True)
            thread.start()
            result = train(quiet(tiny, shards, tmp_path, run_name="offline", experiment="offline",
                                tracking_uri=mlflow_server.uri, tracking_offline=True,
                                register_name="fdrl-offline"),
                           train_loop=hooks.pauses_at({2}, str(marks)))
            thread.join(timeout=600)
            assert result.mlflow_run_id
            losses = _losses(mlflow_server.uri, result.mlflow_run_id)
            version = MlflowClient(mlflow_server.uri).get_model_version_by_alias("fdrl-offline", "candidate")
    finally:
        if not mlflow_server.running():
            mlflow_server.start()
    assert sorted(losses) == [1, 2, 3, 4] and version.run_id == result.mlflow_run_id
