"""fdrl.tracking against real MLflow backends: a sqlite store and a real `mlflow server` that we
kill mid-run. No mocks."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fdrl.tracking import tracker as tracking
from fdrl.tracking.tracker import (Tracker, default_artifact_root, default_tracking_uri, ensure_experiment,
                           flatten_params, git_commit)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite db for the module: creating its tables takes seconds, so tests share it and
    use distinct experiment names."""
    root = tmp_path_factory.mktemp("mlflow")
    return root, f"sqlite:///{root}/mlflow.db"


@pytest.fixture
def fast_http_env(monkeypatch):
    # Tracker sets these process-wide when unset; delenv makes monkeypatch restore them after.
    for k in tracking.FAST_FAIL_HTTP_ENV:
        monkeypatch.delenv(k, raising=False)


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.DEFAULT_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_artifact_root() == (tmp_path.resolve() / "mlartifacts").as_uri()
    home = tmp_path / "home"
    monkeypatch.setenv(tracking.DEFAULT_ROOT_ENV, str(home))
    assert default_tracking_uri() == f"sqlite:///{home.resolve()}/mlflow.db"
    assert default_artifact_root() == (home.resolve() / "mlartifacts").as_uri()
    x = (tmp_path / "x").resolve()
    assert default_tracking_uri(tmp_path / "x") == f"sqlite:///{x}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert default_tracking_uri() == "http://example.invalid:5000"


def test_flatten_params_and_git():
    flat = flatten_params({"opt": {"lr": 1e-3, "betas": [0.9, 0.99]}, "n": 3, "empty": {},
                           "none": None, "long": "x" * 10_000})
    assert flat["opt.lr"] == "0.001" and flat["opt.betas.1"] == "0.99"
    assert flat["n"] == "3" and flat["empty"] == "{}" and flat["none"] == "None"
    assert len(flat["long"]) == tracking.MAX_PARAM_VAL_LENGTH
    assert all(isinstance(v, str) for v in flat.values())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one): the commit is HEAD's
        assert git_commit(REPO) == head.stdout.strip()
    assert git_commit(Path("/")) is None


def test_sqlite_roundtrip(store, tmp_path):
    root, uri = store
    art_root = (tmp_path / "explicit-artifacts").as_uri()
    exp_id = ensure_experiment("roundtrip", uri, artifact_root=art_root)
    assert ensure_experiment("roundtrip", uri) == exp_id  # get, not create
    client = MlflowClient(uri)
    assert client.get_experiment(exp_id).artifact_location == f"{art_root}/roundtrip"

    with Tracker("roundtrip", run_name="r1", tracking_uri=uri, tags={"kind": "test"}) as t:
        assert t.run_id is not None
        t.log_params({"opt": {"lr": 1e-3, "betas": [0.9, 0.99]}, "steps": 10})
        for step in range(5):
            t.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        t.set_tags({"stage": "done"})
        t.log_artifact(_png(tmp_path / "sample.png"), artifact_path="plots")
        t.log_dict({"a": [1, 2]}, "config/cfg.json")
    assert t.dropped == {}

    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["opt.lr"] == "0.001" and run.data.params["opt.betas.1"] == "0.99"
    assert run.data.tags["kind"] == "test" and run.data.tags["stage"] == "done"
    hist = client.get_metric_history(t.run_id, "loss")
    assert [m.step for m in hist] == [0, 1, 2, 3, 4]
    assert hist[2].value == pytest.approx(1 / 3)
    assert [f.path for f in client.list_artifacts(t.run_id, "plots")] == ["plots/sample.png"]
    assert [f.path for f in client.list_artifacts(t.run_id, "config")] == ["config/cfg.json"]
    assert run.info.artifact_uri.startswith(f"{art_root}/roundtrip/")
    assert (tmp_path / "explicit-artifacts" / "roundtrip" / t.run_id / "artifacts" / "plots"
            / "sample.png").is_file()


def test_default_artifact_location_next_to_sqlite_db(store):
    root, uri = store
    exp_id = ensure_experiment("beside-db", uri)
    loc = MlflowClient(uri).get_experiment(exp_id).artifact_location
    assert loc == f"{(root / 'mlartifacts').resolve().as_uri()}/beside-db"


def test_resume_and_failed_status(store, caplog):
    _, uri = store
    t1 = Tracker("resume", tracking_uri=uri)
    t1.log_params({"lr": 0.1})
    for step in range(3):
        t1.log_metrics({"loss": float(step)}, step)
    with pytest.raises(RuntimeError):
        with t1:
            raise RuntimeError("preempted")
    client = MlflowClient(uri)
    assert client.get_run(t1.run_id).info.status == "FAILED"

    with Tracker("resume", tracking_uri=uri, run_id=t1.run_id) as t2:
        assert t2.run_id == t1.run_id
        assert client.get_run(t1.run_id).info.status == "RUNNING"
        # MLflow refuses to change a logged param: that payload is dropped, but it is a
        # rejection, not an outage, so the calls after it still go through.
        with caplog.at_level(logging.WARNING, logger="fdrl.tracking"):
            t2.log_params({"lr": 0.2})
        assert t2.dropped == {"params": 1} and "MLflow rejected 1 params (lr)" in caplog.text
        for step in range(3, 6):
            t2.log_metrics({"loss": float(step)}, step)
    assert [m.step for m in client.get_metric_history(t1.run_id, "loss")] == list(range(6))
    assert client.get_run(t1.run_id).info.status == "FINISHED"


def test_nested_child_run(store):
    _, uri = store
    with Tracker("sweep", run_name="parent", tracking_uri=uri) as parent:
        with Tracker("sweep", run_name="trial-0", tracking_uri=uri,
                     parent_run_id=parent.run_id) as child:
            child.log_metrics({"score": 0.5}, step=0)
    client = MlflowClient(uri)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.run_id != parent.run_id


def test_disabled_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = Tracker("off", tracking_uri=f"sqlite:///{tmp_path}/never.db", enabled=False)
    t.log_params({"a": 1})
    t.log_metrics({"loss": 1.0}, 0)
    t.set_tags({"x": "y"})
    t.log_artifact(tmp_path / "missing.png")
    t.log_dict({"a": 1}, "a.json")
    t.end()
    assert t.run_id is None and t.dropped == {}
    assert list(tmp_path.iterdir()) == []


class FrozenClock:
    """The tracker's breaker clock, moved only by the test."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_unreachable_from_start(caplog, fast_http_env, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="fdrl.tracking"):
        t = Tracker("nowhere", tracking_uri=uri, clock=FrozenClock())
        assert t.run_id is None
        t.log_params({"a": {"b": 1, "c": 2}})
        for step in range(3):
            t.log_metrics({"loss": 1.0, "lr": 0.1}, step)
        t.set_tags({"x": "y"})
        t.log_artifact(_png(tmp_path / "p.png"))
        t.end()
    assert t.attempts == 1  # the failed run start; every later call is dropped without trying
    assert t.dropped == {"run": 1, "params": 2, "metrics": 6, "tags": 1, "artifacts": 1}
    text = caplog.text
    assert "MLflow unreachable" in text and "dropped run start in experiment 'nowhere'" in text
    assert "6 metric values (steps 0..2)" in text
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # fast-fail defaults were set


def _start_server(db: str, artifacts: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db,
         "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # own process group: the server spawns workers we must kill too
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # readiness poll of /health
        assert proc.poll() is None, "mlflow server exited during startup"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    _kill(proc)
    raise TimeoutError("mlflow server did not become ready")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_server_dies_mid_run_then_recovers(tmp_path, caplog, fast_http_env):
    db = f"sqlite:///{tmp_path}/server.db"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(db, tmp_path / "server-artifacts", port)
    try:
        clock = FrozenClock()
        t = Tracker("served", run_name="victim", tracking_uri=url, retry_after_s=2.0, clock=clock)
        assert t.run_id is not None
        t.log_params({"lr": 0.1})
        for step in range(5):
            t.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)

        _kill(server)
        before = t.attempts
        with caplog.at_level(logging.WARNING, logger="fdrl.tracking"):
            for step in range(5, 10):
                t.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
            t.log_artifact(_png(tmp_path / "during-outage.png"))
        # A dead server must not stall training: one call finds it down, the breaker skips the rest.
        assert t.attempts - before == 1
        assert t.dropped == {"metrics": 10, "artifacts": 1}
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "fdrl.tracking" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once per burst, not once per call
        assert "dropped metrics at step 5 (loss, lr)" in warnings[0]
        assert "MLflow unreachable" in warnings[0] and url in warnings[0]

        # Same db, same port: the logged steps survived, and the tracker picks up again
        # once its breaker lets calls through.
        server = _start_server(db, tmp_path / "server-artifacts", port)
        client = MlflowClient(url)
        assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [0, 1, 2, 3, 4]
        clock.now += 2.0  # the breaker window is over
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fdrl.tracking"):
            t.log_metrics({"loss": 0.01}, step=10)
            t.log_artifact(_png(tmp_path / "after.png"))
            t.end()
        assert "reachable again" in caplog.text
        assert "10 metric values (steps 5..9), 1 artifacts" in caplog.text  # end-of-run summary
        assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [0, 1, 2, 3, 4, 10]
        assert [f.path for f in client.list_artifacts(t.run_id)] == ["after.png"]
        assert client.get_run(t.run_id).info.status == "FINISHED"
    finally:
        _kill(server)
