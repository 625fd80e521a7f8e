"""Distributed training on a real local Ray cluster, with real shards and a real sqlite MLflow."""

import json
import socket
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from fdrl.core.priors import make_simple_prior

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fdrl.data.writer import convert

    out = tmp_path_factory.mktemp("mnist") / "shards"
    convert("mnist", None, out, shard_size=64, limit=256, progress=False)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


def _final_tensors(result) -> dict[str, torch.Tensor]:
    d = Path(result.checkpoint)
    tensors = {f"model.{k}": v for k, v in load_file(str(d / "model.safetensors")).items()}
    tensors.update({f"ema.{k}": v for k, v in load_file(str(d / "ema.safetensors")).items()})
    state = torch.load(d / "state.pt", weights_only=True)
    for i, s in state["optimizer"]["state"].items():
        tensors[f"adam.{i}.exp_avg"] = s["exp_avg"]
        tensors[f"adam.{i}.exp_avg_sq"] = s["exp_avg_sq"]
    return tensors


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"tensors differ after resume: {differing[:5]}"


@pytest.fixture(scope="module")
def straight(ray_cluster, shards, workdir, train, tiny):
    return train(tiny(shards, workdir, run_name="straight"))


def test_straight_run_is_tracked_in_mlflow(straight, workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    run = client.get_run(straight.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["pairing"] == "lsif-chi2" and run.data.params["flow_steps"] == "2"
    assert len(run.data.tags["manifest_hash"]) == 64 and "git_commit" in run.data.tags
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    for name in ("log_r_data", "log_r_flowed", "lr", "images_per_s", "step_time"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "prior", "checkpoint"} <= artifacts
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert grids == ["samples/step_0000002.png", "samples/step_0000004.png"]


def test_resume_gives_identical_parameters(straight, shards, workdir, train, tiny):
    train(tiny(shards, workdir, run_name="split", steps=2))
    resumed = train(tiny(shards, workdir, run_name="split", steps=4, resume=True))
    _assert_identical(_final_tensors(straight), _final_tensors(resumed))
    # The resumed run continues the same MLflow run.
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    losses = client.get_metric_history(resumed.mlflow_run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]


def test_killed_rank0_worker_restarts_from_checkpoint(straight, shards, workdir, train, hooks, tiny):
    """Rank 0's process is SIGKILLed right after the step-2 checkpoint: the run restarts from it,
    ends at the straight run's weights, and logs the straight run's losses."""
    marker = workdir / "killed-rank0"
    result = train(tiny(shards, workdir, run_name="killed"),
                   train_loop=hooks.killed_after(2, str(marker)))
    assert marker.exists()  # the kill happened
    _assert_identical(_final_tensors(straight), _final_tensors(result))
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    straight_losses = {m.step: m.value for m in client.get_metric_history(straight.mlflow_run_id, "loss")}
    losses = client.get_metric_history(result.mlflow_run_id, "loss")
    assert {m.step for m in losses} == {1, 2, 3, 4}
    assert all(m.value == straight_losses[m.step] for m in losses)


def test_a_failure_that_would_repeat_is_not_retried(ray_cluster, shards, workdir, train, hooks, tiny):
    from fdrl.core.step import NonFiniteLossError
    from fdrl.distributed.trainer import RunFailed

    with pytest.raises(RunFailed, match="worker 0: NonFiniteLossError: boom") as err:
        train(tiny(shards, workdir, run_name="diverges", max_failures=2),
              train_loop=hooks.raises_after(1, NonFiniteLossError("boom")))
    assert isinstance(err.value.cause, NonFiniteLossError)
    run = MlflowClient(f"sqlite:///{workdir}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_experiment_by_name("fdrl").experiment_id],
        filter_string="attributes.run_name = 'diverges'")[0]
    assert run.info.status == "FAILED" and "NonFiniteLossError: boom" in run.data.tags["fdrl.failure"]


def test_training_goes_on_when_mlflow_is_unreachable(ray_cluster, shards, workdir, train, tiny):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from fdrl.tracking.runs import TrackingUnreachableError

    dead = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingUnreachableError, match=f"MLflow at {dead} is unreachable"):
        train(tiny(shards, workdir, run_name="no-mlflow", steps=2, tracking_uri=dead))
    result = train(tiny(shards, workdir, run_name="no-mlflow", steps=2, register=False,
                        tracking_uri=dead, tracking_offline=True))
    assert result.checkpoint is not None and result.mlflow_run_id == ""
    # Everything logged waits in the run's spool, for when the server answers.
    info = json.loads((Path(result.run_dir) / "fdrl_run.json").read_text())
    records = [json.loads(line) for line in (Path(info["spool"]) / "journal.jsonl").read_text().splitlines()]
    assert sum(r["op"] == "metrics" for r in records) >= 2


def test_bad_inputs_get_named_errors(ray_cluster, shards, workdir, train, tiny):
    with pytest.raises(FileNotFoundError, match="data path does not exist: .*missing-shards"):
        train(tiny(workdir / "missing-shards", workdir))
    wrong = workdir / "prior-rgb32.safetensors"
    make_simple_prior("uniform", (3, 32, 32), clamp=1.0).save(wrong)
    with pytest.raises(ValueError, match=r"prior has shape \(3, 32, 32\) but the data has shape \(1, 32, 32\)"):
        train(tiny(shards, workdir, prior="uniform", prior_path=str(wrong)))
    with pytest.raises(ValueError, match="unknown pairing 'chi3'"):
        train(tiny(shards, workdir, pairing="chi3"))


def test_resume_with_prefetch_matches_the_straight_run(straight, shards, workdir, train, tiny):
    """Prefetching changes no batch, and checkpoints keep the consumer's position rather than the
    read-ahead thread's: a split run with prefetch on ends where the straight inline run ended."""
    train(tiny(shards, workdir, run_name="split-prefetch", steps=2, prefetch=3))
    resumed = train(tiny(shards, workdir, run_name="split-prefetch", steps=4, resume=True,
                                prefetch=3))
    _assert_identical(_final_tensors(straight), _final_tensors(resumed))
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    waits = client.get_metric_history(resumed.mlflow_run_id, "data_wait_s")
    assert sorted(m.step for m in waits) == [1, 2, 3, 4] and all(m.value >= 0 for m in waits)


def test_gpu_auto_picks_cpu_and_gpu_on_fails_on_the_driver(straight, shards, workdir, train, tiny):
    assert straight.used_gpu is False  # --gpu auto (the default) on this CPU-only cluster
    with pytest.raises(ValueError, match="--gpu on, but the Ray cluster has no GPUs"):
        train(tiny(shards, workdir, run_name="gpu-on", gpu="on"))
    assert not (workdir / "runs" / "gpu-on").exists()  # refused before the run started


def test_fast_path_trains_under_ddp(ray_cluster, shards, workdir, train, tiny):
    """bf16 autocast, channels_last weights and prefetching through DDP over gloo: the run ends
    with finite losses and a checkpoint whose weights load into a plain fp32 network."""
    from fdrl.core.networks import build_network
    result = train(tiny(shards, workdir, run_name="fast", steps=2, precision="bf16",
                               channels_last=True, prefetch=2))
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    losses = client.get_metric_history(result.mlflow_run_id, "loss")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(m.value)) for m in losses)
    weights = load_file(str(Path(result.checkpoint) / "ema.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    build_network("mnist32").load_state_dict(weights)
