"""End to end through a real Ray head: `ray job submit --working-dir <repo>` runs jobs/fdrl_mnist.py
(prior fit with Ray tasks, a 2-worker TorchTrainer, MLflow logging) on a tiny MNIST shard set.

The head is a child process with its own ports, temp dir and auth token, so it never touches
another Ray on the machine; it is stopped by killing its process group (not with the CLI that stops every Ray on the machine)."""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts Ray, a server or a job process

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, python
READY_TIMEOUT_S = 120


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_job_api(url: str, token: str, head: subprocess.Popen, log: Path) -> None:
    """Poll the dashboard's job API until it answers 200, the head dies, or the deadline passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    last = "no answer yet"
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray head exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as err:
            last = repr(err)
        time.sleep(0.5)
    pytest.fail(f"job API at {url} not ready after {READY_TIMEOUT_S} s ({last}):\n"
                f"{log.read_text()[-3000:]}")


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head's process group (ray start --block cleans up its children), then SIGKILL;
    finally any stray process of this head (its temp dir is in their command lines)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 10  # the group's children exit on their own; wait for that
    while _pids_with(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _pids_with(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pids_with(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.timeout(600)
def test_ray_job_submit_trains_and_logs(tmp_path):
    from mlflow.tracking import MlflowClient

    from fdrl.data.writer import convert

    shards = tmp_path / "shards"
    convert("mnist", None, shards, shard_size=64, limit=256, progress=False)
    storage = tmp_path / "runs"
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"

    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rayjs-", dir="/tmp")
    (gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env,
     node_manager, object_manager) = _free_ports(9)
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in the job = the venv's
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,  # this head's own token: ~/.ray/auth_token is left alone
        "PYTHONUNBUFFERED": "1",
    }
    # Ray's own processes that look the cluster up by "auto" (e.g. Train's placement-group
    # cleaner) would find every Ray on this machine; point them at this one.
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    env.pop("MLFLOW_TRACKING_URI", None)
    head_log = tmp_path / "head.log"
    head_cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        "--object-store-memory=200000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    with open(head_log, "w") as log_file:
        head = subprocess.Popen(head_cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_for_job_api(url, token, head, head_log)

        # .venv, runs, data, mlartifacts, mlflow.db are in .gitignore, which Ray's upload honours;
        # the excludes repeat them so the upload stays small even without that file.
        runtime_env_json = json.dumps({"excludes": [".venv", ".git", "runs", "data", "mlruns",
                                                    "mlartifacts", "mlflow.db", "__pycache__"]})
        submit = [
            str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
            "--runtime-env-json", runtime_env_json, "--",
            "python", "jobs/fdrl_mnist.py", "--data", str(shards), "--steps", "2", "--workers", "2",
            "--batch", "8", "--flow-steps", "2", "--extra-steps", "1", "--log-every", "1",
            "--checkpoint-every", "2", "--sample-every", "2", "--grid-size", "4",
            "--storage", str(storage), "--tracking-uri", tracking_uri,
            "--no-fid",  # the demo's FID is tested in test_fid_training.py
        ]
        start = time.monotonic()
        job = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=480)
        output = job.stdout + job.stderr
        print(output)  # shown by pytest on failure (or with -s)
        assert job.returncode == 0, f"ray job submit exited {job.returncode}:\n{output[-6000:]}"
        assert "== done ==" in output, output[-6000:]
        print(f"ray job submit took {time.monotonic() - start:.1f} s")

        match = re.search(r"MLflow run:\s+([0-9a-f]{32})", output)
        assert match, f"no MLflow run id in the job output:\n{output[-3000:]}"
        run_id = match.group(1)
        mlflow_client = MlflowClient(tracking_uri)
        run = mlflow_client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["workers"] == "2"
        loss = mlflow_client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in loss) == [1, 2]
        grids = [a.path for a in mlflow_client.list_artifacts(run_id, "samples")]
        assert grids and all(p.endswith(".png") for p in grids), grids
        assert list((storage / run.info.run_name / "samples").glob("*.png"))
    finally:
        _stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
