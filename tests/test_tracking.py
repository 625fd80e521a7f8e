"""fdrl.tracking against real MLflow backends: a sqlite store and a real `mlflow server` that we
kill mid-run; shippers killed with SIGKILL between sending and acknowledging. No mocks."""

import json
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

import fdrl
from fdrl.tracking import backend
from fdrl.tracking.replay import replay
from fdrl.tracking.spool import JOURNAL, SpoolError, read_state
from fdrl.tracking.tracker import (Tracker, default_artifact_root, default_tracking_uri, ensure_experiment,
                                   flatten_params, git_commit)

REPO = Path(__file__).resolve().parents[1]
# Subprocesses import the same fdrl as this test (a worktree's checkout, not the installed one).
SUB_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(Path(fdrl.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite db for the module: creating its tables takes seconds, so tests share it and
    use distinct experiment names."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the tables here, not in the first test
    return root, uri


@pytest.fixture(autouse=True)
def spool_home(tmp_path, monkeypatch):
    """Default spools go under $FDRL_HOME: keep them in the test's tmp folder."""
    home = tmp_path / "fdrl-home"
    monkeypatch.setenv("FDRL_HOME", str(home))
    return home


@pytest.fixture
def fast_http_env(monkeypatch):
    # Tracker sets these process-wide when unset; delenv makes monkeypatch restore them after.
    for k in backend.FAST_FAIL_HTTP_ENV:
        monkeypatch.delenv(k, raising=False)


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_url() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # nothing listens there


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fdrl.tracking" and r.levelno == logging.WARNING]


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FDRL_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_artifact_root() == (tmp_path.resolve() / "mlartifacts").as_uri()
    home = tmp_path / "home"
    monkeypatch.setenv("FDRL_HOME", str(home))
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
    assert len(flat["long"]) == backend.MAX_PARAM_VAL_LENGTH
    assert all(isinstance(v, str) for v in flat.values())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one): the commit is HEAD's
        assert git_commit(REPO) == head.stdout.strip()
    assert git_commit(Path("/")) is None


def test_sqlite_roundtrip(store, tmp_path, spool_home):
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
        (tmp_path / "sample.png").unlink()  # the spool holds a copy made at call time
        t.log_dict({"a": [1, 2]}, "config/cfg.json")
        spool = t.spool_dir
        assert spool.parent == spool_home.resolve() / backend.SPOOL_ROOT
    assert t.dropped == {} and t.pending == 0
    assert not spool.exists()  # a default spool is removed once everything is shipped

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
    assert t1.run_id is not None  # MLflow is up: the constructor waited for the run
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
            assert t2.drain(timeout=60)
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


def test_disabled_touches_nothing(tmp_path, monkeypatch, spool_home):
    monkeypatch.chdir(tmp_path)
    t = Tracker("off", tracking_uri=f"sqlite:///{tmp_path}/never.db", enabled=False)
    t.log_params({"a": 1})
    t.log_metrics({"loss": 1.0}, 0)
    t.set_tags({"x": "y"})
    t.log_artifact(tmp_path / "missing.png")
    t.log_dict({"a": 1}, "a.json")
    assert t.drain(0) and t.wait_for_run(0) is None
    t.end()
    assert t.run_id is None and t.spool_dir is None and t.dropped == {}
    assert list(tmp_path.iterdir()) == []  # no db, no spool (spool_home was never created)


def test_reopened_spool_resumes_its_run(store, tmp_path):
    _, uri = store
    spool = tmp_path / "run-spool"
    t1 = Tracker("reopen", run_name="r", tracking_uri=uri, spool_dir=spool)
    for step in range(3):
        t1.log_metrics({"loss": float(step)}, step)
    with pytest.raises(SpoolError, match="in use"):  # one owner per spool
        Tracker("reopen", tracking_uri=uri, spool_dir=spool)
    t1.end("FAILED")
    client = MlflowClient(uri)
    assert client.get_run(t1.run_id).info.status == "FAILED"
    assert read_state(spool)["run_id"] == t1.run_id  # a given spool is kept, with its run id

    t2 = Tracker("ignored", run_name="ignored", tracking_uri=uri, spool_dir=spool, tags={"attempt": 2})
    assert t2.run_id == t1.run_id and t2.spool_dir == spool.resolve()
    assert client.get_run(t1.run_id).info.status == "RUNNING"
    for step in range(3, 6):
        t2.log_metrics({"loss": float(step)}, step)
    t2.end()
    run = client.get_run(t1.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
    assert _steps(client, t1.run_id) == list(range(6))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_spool_journal_recovery(tmp_path):
    """A torn last line (a process killed mid-append) is cut off on reopen; a damaged line
    followed by good ones is kept and read as corrupt, not taken for the end of the journal."""
    from fdrl.tracking.spool import Spool

    sp = Spool(tmp_path / "s")
    for step in range(3):
        sp.append("metrics", metrics={"loss": float(step)}, step=step)
    sp.close()
    journal = tmp_path / "s" / JOURNAL
    whole = journal.read_bytes()
    with open(journal, "ab") as f:
        f.write(b'{"seq":4,"op":"metrics","metr')
    sp = Spool(tmp_path / "s")
    assert sp.last_seq == 3 and journal.read_bytes() == whole
    assert sp.append("tags", tags={"a": "b"}) == 4
    with open(journal, "ab") as f:
        f.write(b"\x00\x00garbage\n")
    sp.append("tags", tags={"a": "c"})
    sp.close()
    sp = Spool(tmp_path / "s")
    assert sp.last_seq == 5
    ops = [r["op"] for r, _ in sp.read(0)]
    assert ops == ["metrics"] * 3 + ["tags", "corrupt", "tags"]
    sp.close()


# Logs a step, then a fixed amount of CPU work, forever: the training loop the test kills.
PRODUCER = r"""
import sys
from fdrl.tracking.tracker import Tracker

t = Tracker("killed-producer", run_name="p", tracking_uri=sys.argv[1], spool_dir=sys.argv[2])
step = 0
while True:
    t.log_metrics({"loss": 1.0 / (step + 1)}, step)
    step += 1
    sum(i * i for i in range(20_000))
"""


def test_producer_killed_then_resumed_from_its_spool(store, tmp_path):
    """The training process is SIGKILLed at an arbitrary point: a resumed process reopens
    its spool and the run ends up with every step the first one logged, once, and its own."""
    _, uri = store
    spool = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, uri, str(spool)], env=SUB_ENV,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:  # until 300 steps are spooled
            journal = spool / JOURNAL
            if journal.exists() and journal.read_bytes().count(b"\n") > 300:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.kill()  # SIGKILL: no end(), maybe a torn line, maybe a batch sent but not acked
        proc.wait(timeout=30)

    t = Tracker("ignored", tracking_uri=uri, spool_dir=spool)
    records = [json.loads(line) for line in (spool / JOURNAL).read_text().splitlines()]  # no torn line now
    logged = sum(r["op"] == "metrics" for r in records)
    assert logged > 300 and t.run_id is not None
    for step in range(logged, logged + 10):
        t.log_metrics({"loss": 1.0 / (step + 1)}, step)
    t.end()
    client = MlflowClient(uri)
    assert _steps(client, t.run_id) == list(range(logged + 10))
    assert client.get_run(t.run_id).info.status == "FINISHED"


def _offline_spool(spool: Path, steps: int, tmp_path: Path, experiment: str) -> tuple[Tracker, list[str]]:
    """A spool written while MLflow was unreachable: run, params, ``steps`` loss values, a
    param that changes value (MLflow will refuse it), tags, an artifact and the end record.
    Returns the tracker and its warnings."""
    logger = logging.getLogger("fdrl.tracking")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        t = Tracker(experiment, run_name="offline", tracking_uri=_dead_url(), spool_dir=spool,
                    start_timeout=0)
        t.log_params({"lr": 0.1, "opt": {"betas": [0.9, 0.99]}})
        for step in range(steps):
            t.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
            if step == steps // 2:
                t.log_params({"lr": 0.2})
                t.set_tags({"stage": "middle"})
        t.set_tags({"stage": "done"})
        t.log_artifact(_png(tmp_path / "grid.png"), "samples")
        t.end()  # waits for one failed attempt, not for the dead server
    finally:
        logger.removeHandler(handler)
    return t, [r.getMessage() for r in records]


def _check_offline_run(client: MlflowClient, run_id: str, steps: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "offline"
    assert run.data.params == {"lr": "0.1", "opt.betas.0": "0.9", "opt.betas.1": "0.99"}
    assert run.data.tags["stage"] == "done"  # tags in journal order: the last value wins
    hist = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(steps))  # each step exactly once
    assert {m.step: m.value for m in hist}[7] == 1 / 8
    assert [f.path for f in client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second run


def test_server_down_at_end_then_replay_cli_with_torn_line(store, tmp_path, fast_http_env):
    _, uri = store
    spool = tmp_path / "offline-spool"
    t, warnings = _offline_spool(spool, 40, tmp_path, "offline-cli")
    assert t.run_id is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # fast-fail defaults were set
    unreachable = [w for w in warnings if w.startswith("MLflow unreachable")]
    assert len(unreachable) == 1 and str(spool.resolve()) in unreachable[0]  # once per outage
    left = [w for w in warnings if "not shipped" in w]
    assert len(left) == 1 and f"python -m fdrl.tracking.replay {spool.resolve()}" in left[0]
    assert "80 metric values (steps 0..39)" in left[0] and "the end of the run" in left[0]
    journal = spool / JOURNAL
    whole = journal.read_bytes()
    # A process killed mid-append leaves a torn last line: replay must ignore it, not choke.
    with open(journal, "ab") as f:
        f.write(b'{"seq":999,"op":"metrics","t":1,"metr')

    out = subprocess.run([sys.executable, "-m", "fdrl.tracking.replay", str(spool), "--tracking-uri", uri,
                          "--timeout", "120"], capture_output=True, text=True, env=SUB_ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    assert journal.read_bytes() == whole  # the torn line was cut off
    assert "MLflow rejected 1 params (lr)" in out.stderr  # the changed param, alone
    client = MlflowClient(uri)
    _check_offline_run(client, run_id, 40)
    assert read_state(spool)["run_id"] == run_id
    assert replay(spool, uri) == run_id  # nothing left: a second replay sends nothing
    assert _steps(client, run_id) == list(range(40))


# Runs replay() in a process that SIGKILLs itself right before acknowledging the batch that
# ends at or after seq KILL_AT: MLflow has applied that batch, the spool does not know it.
KILL_BEFORE_ACK = r"""
import os, signal, sys
from fdrl.tracking import spool as spool_mod
from fdrl.tracking.replay import replay

spool_dir, uri, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_ack = spool_mod.Spool.ack

def ack(self, seq, offset, **fields):
    if seq >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_ack(self, seq, offset, **fields)

spool_mod.Spool.ack = ack
replay(spool_dir, uri)
"""


@pytest.mark.parametrize("kill_at", [1, 1000], ids=["after-create-run", "after-metrics-batch"])
def test_replay_after_shipper_killed_between_send_and_ack(store, tmp_path, kill_at, fast_http_env):
    _, uri = store
    steps = 1200  # 2400 metric values: more than 2 batches of 1000
    spool = tmp_path / "spool"
    experiment = f"offline-kill-{kill_at}"
    _offline_spool(spool, steps // 2, tmp_path, experiment)
    # More records than one batch: reopen the spool offline and add steps.
    t = Tracker(experiment, tracking_uri=_dead_url(), spool_dir=spool, start_timeout=0)
    for step in range(steps // 2, steps):
        t.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
    t.end(timeout=0)
    spool_id = json.loads((spool / JOURNAL).read_text().splitlines()[0])["spool_id"]

    out = subprocess.run([sys.executable, "-c", KILL_BEFORE_ACK, str(spool), uri, str(kill_at)],
                         capture_output=True, text=True, env=SUB_ENV, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr
    client = MlflowClient(uri)
    runs = client.search_runs([ensure_experiment(experiment, uri)], f"tags.`fdrl.spool` = '{spool_id}'")
    assert len(runs) == 1  # created, but the spool never heard its id
    state = read_state(spool)
    assert state.get("acked", 0) < kill_at
    if kill_at == 1:
        assert "run_id" not in state
    else:  # the killed batch's points are in MLflow although the spool has not acked them
        shipped = _steps(client, runs[0].info.run_id)
        acked_steps = [r["step"] for r in map(json.loads, (spool / JOURNAL).read_text().splitlines())
                       if r["op"] == "metrics" and r["seq"] <= state["acked"]]
        assert len(shipped) > len(acked_steps)

    run_id = replay(spool, uri)
    assert run_id == runs[0].info.run_id  # the run made by the killed process was adopted
    _check_offline_run(client, run_id, steps)
    assert len(client.get_metric_history(run_id, "lr")) == steps


def test_follower_waits_for_the_run_of_the_spool_it_follows(store, tmp_path, fast_http_env):
    """A worker's tracker follows the driver's spool: it logs into the run the driver's spool
    creates, whenever that happens, and leaves the run's status to the driver."""
    _, uri = store
    driver_spool = tmp_path / "driver"
    driver = Tracker("follow", run_name="driver", tracking_uri=_dead_url(), spool_dir=driver_spool,
                     start_timeout=0)
    driver.log_params({"lr": 0.1})
    driver.end("FINISHED", timeout=0)  # MLflow down: the run does not exist yet
    worker = Tracker("follow", tracking_uri=uri, spool_dir=tmp_path / "worker",
                     follow_spool=driver_spool, start_timeout=0, max_backoff_s=0.5)
    for step in range(5):
        worker.log_metrics({"loss": float(step)}, step)
    assert not worker.drain(timeout=1.0) and worker.run_id is None

    run_id = replay(driver_spool, uri)  # MLflow is back for the driver's spool
    assert worker.wait_for_run(timeout=60) == run_id
    worker.end(timeout=60)
    client = MlflowClient(uri)
    assert _steps(client, run_id) == list(range(5))
    assert client.get_run(run_id).info.status == "FINISHED"


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


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_server_down_at_construction(tmp_path, fast_http_env):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    seen = []
    started_ms = int(time.time() * 1000)
    t = Tracker("late", run_name="late-run", tracking_uri=url, tags={"kind": "test"},
                spool_dir=tmp_path / "spool", on_run_id=seen.append)
    assert t.run_id is None and t.wait_for_run(timeout=0.5) is None
    t.log_params({"lr": 0.1})
    for step in range(10):
        t.log_metrics({"loss": float(step)}, step)
    t.set_tags({"stage": "logged while down"})
    server = _start_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "server-artifacts", port)
    try:
        server_up_ms = int(time.time() * 1000)
        run_id = t.wait_for_run(timeout=60)
        assert run_id is not None and t.run_id == run_id and seen == [run_id]
        t.end(timeout=60)
        client = MlflowClient(url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == "late-run"
        assert started_ms <= run.info.start_time < server_up_ms  # when training started
        assert run.data.tags["kind"] == "test" and run.data.tags["stage"] == "logged while down"
        assert run.data.params == {"lr": "0.1"}
        assert _steps(client, run_id) == list(range(10))
    finally:
        _kill(server)


def _cpu_work() -> int:
    """A fixed amount of CPU work: the training step between two tracker calls."""
    return sum(i * i for i in range(100_000))


@pytest.mark.integration
@pytest.mark.slow  # the same > 1 min outage runs in the default suite through a whole training run
@pytest.mark.timeout(600)  # (test_reliability.py::test_an_mlflow_outage_mid_training_loses_nothing)
def test_outage_loses_nothing(tmp_path, caplog, fast_http_env):
    """Issue 22: a real server SIGKILLed mid-run and back after more than a minute (longer than
    the HTTP retries and the shipper's longest backoff): the run holds every logged step once,
    what was logged during the outage, and is FINISHED."""
    db = f"sqlite:///{tmp_path}/server.db"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    down_for = 65.0
    server = _start_server(db, tmp_path / "server-artifacts", port)
    try:
        with caplog.at_level(logging.WARNING, logger="fdrl.tracking"):
            t = Tracker("served", run_name="victim", tracking_uri=url, spool_dir=tmp_path / "spool")
            assert t.run_id is not None
            t.log_params({"lr": 0.1})
            step = 0

            def train(n_or_until):
                nonlocal step
                while (step < n_or_until if isinstance(n_or_until, int) else not n_or_until()):
                    t.log_metrics({"loss": 1.0 / (step + 1)}, step)
                    step += 1
                    _cpu_work()

            train(50)
            assert t.drain(timeout=60)  # the first 50 steps are in MLflow
            _kill(server)
            killed = time.monotonic()
            train(step + 20)
            t.log_params({"outage_param": 1})
            t.set_tags({"outage_tag": "yes"})
            t.log_artifact(_png(tmp_path / "during-outage.png"), "outage")
            (tmp_path / "during-outage.png").unlink()
            t.log_dict({"steps_before_outage": 50}, "outage/info.json")
            train(lambda: time.monotonic() - killed > down_for)
            outage_steps = step - 50
            assert t.pending >= outage_steps  # nothing reached the dead server

            restart_ms = int(time.time() * 1000)
            server = _start_server(db, tmp_path / "server-artifacts", port)
            downtime = time.monotonic() - killed
            train(step + 50)  # training goes on while the backlog ships
            assert t.drain(timeout=120)
            t.end(timeout=60)
        total = step
        print(f"\noutage test: {total} steps logged, {outage_steps} during a {downtime:.0f}s outage")
        client = MlflowClient(url)
        hist = client.get_metric_history(t.run_id, "loss")
        assert sorted(m.step for m in hist) == list(range(total))  # every step, exactly once
        assert all(m.value == 1.0 / (m.step + 1) for m in hist)
        # Points carry the time they were logged, not the time they were shipped.
        assert all(m.timestamp < restart_ms for m in hist if m.step < 50 + outage_steps)
        run = client.get_run(t.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.1", "outage_param": "1"}
        assert run.data.tags["outage_tag"] == "yes"
        assert sorted(f.path for f in client.list_artifacts(t.run_id, "outage")) == [
            "outage/during-outage.png", "outage/info.json"]
        warnings = _warnings(caplog)
        assert sum(w.startswith("MLflow unreachable") for w in warnings) == 1, warnings
        assert any(w.startswith("MLflow reachable again") for w in warnings), warnings
        assert not any("not shipped" in w for w in warnings), warnings
        assert t.dropped == {}
    finally:
        _kill(server)
