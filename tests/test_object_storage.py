"""Multi-node for real, on one machine: data, runs and models on a real S3-compatible server
(moto), MLflow as a server with basic auth whose artifacts go to that bucket, and a simulated
multi-node Ray cluster (``ray.cluster_utils.Cluster``) that loses a worker node mid-run. All
simulated nodes share this machine's disk, so every test deletes the local copies it made
before it trains: nothing may rely on a shared filesystem."""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fdrl.config import TrainConfig
from fdrl.data import storage

pytestmark = [pytest.mark.timeout(900), pytest.mark.integration]
REPO = Path(__file__).resolve().parents[1]


def _job(args: list[str], cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.bucket()


@pytest.fixture(scope="module")
def job_env(mlflow_server, s3_server, tmp_path_factory):
    """A job's environment on the 'cluster': AWS credentials for the bucket, the tracking
    server and its user, and a FDRL_HOME that is not the working directory."""
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, **s3_server.env(), MLFLOW_TRACKING_URI=mlflow_server.uri,
               MLFLOW_TRACKING_USERNAME=mlflow_server.admin_user,
               MLFLOW_TRACKING_PASSWORD=mlflow_server.admin_password,
               FDRL_HOME=str(home), FDRL_CACHE=str(home / "cache"), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def mnist_on_s3(bucket, job_env, tmp_path_factory):
    """datasets/prepare.py --out s3://...: 256 MNIST digits, no local copy."""
    cwd = tmp_path_factory.mktemp("prepare")
    data = f"{bucket}/data/mnist"
    _job([str(REPO / "datasets/prepare.py"), "mnist", "--out", data, "--limit", "256",
          "--shard-size", "64"], cwd, job_env)
    assert storage.is_file(storage.join(data, "manifest.parquet"))
    assert not any(cwd.iterdir())  # nothing landed locally
    return data


def test_prepare_train_register_and_sample_all_on_s3(mnist_on_s3, bucket, job_env, mlflow_server,
                                                     tmp_path):
    """Training with --data and --storage on S3 and a tracking server: checkpoints, run info,
    grids and the prior land in the bucket, the checkpoint tag keeps its scheme, the model is
    registered (its artifacts proxied to the bucket) and jobs/sample.py writes to S3. The working
    directory stays empty: no checkpoint, no database."""
    runs = f"{bucket}/runs"
    _job([str(REPO / "jobs/fdrl_mnist.py"), "--data", mnist_on_s3, "--storage", runs, "--steps", "4",
          "--batch", "8", "--flow-steps", "2", "--extra-steps", "1", "--log-every", "2",
          "--checkpoint-every", "2", "--sample-every", "2", "--grid-size", "4", "--no-fid",
          "--run-name", "on-s3", "--register-name", "fdrl-s3"], tmp_path, job_env)
    run_dir = storage.join(runs, "on-s3")
    names = storage.listdir(run_dir)
    assert "fdrl_run.json" in names and any(n.startswith("checkpoint_") for n in names)
    assert storage.glob(storage.join(run_dir, "samples"), "*.png")
    assert storage.glob(storage.join(runs, "priors"), "*.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing in the working directory

    with mlflow_server.credentials():
        client = MlflowClient(mlflow_server.uri)
        version = client.get_model_version_by_alias("fdrl-s3", "candidate")
        run = client.get_run(version.run_id)
    assert run.data.tags["checkpoint_uri"].startswith("s3://")
    assert storage.listdir(mlflow_server.artifacts)  # the server proxied the artifacts there

    out = f"{bucket}/samples"
    _job([str(REPO / "jobs/sample.py"), "--model", "models:/fdrl-s3@candidate", "--n", "6",
          "--workers", "1", "--out", out], tmp_path, job_env)
    import io

    samples = np.load(io.BytesIO(storage.read_bytes(storage.join(out, "samples.npy"))))
    assert samples.shape == (6, 1, 32, 32) and np.isfinite(samples).all()


def test_the_tracking_server_refuses_clients_without_credentials(mlflow_server, mnist_on_s3,
                                                                 bucket, job_env, tmp_path):
    """Without credentials a client can neither read runs nor register a model nor move an
    alias; a wrong password stops a training job before any worker starts, in one error line."""
    from mlflow.exceptions import MlflowException

    with mlflow_server.credentials(user=""):
        client = MlflowClient(mlflow_server.uri)
        for attempt in (lambda: client.search_experiments(),
                        lambda: client.create_registered_model("intruder"),
                        lambda: client.set_registered_model_alias("fdrl-s3", "champion", "1")):
            with pytest.raises(MlflowException, match="401|nauthorized|authenticated"):
                attempt()
    env = dict(job_env, MLFLOW_TRACKING_PASSWORD="wrong")
    start = time.perf_counter()
    proc = _job([str(REPO / "jobs/fdrl_mnist.py"), "--data", mnist_on_s3, "--storage",
                 f"{bucket}/runs", "--steps", "2", "--no-fid"], tmp_path, env, ok=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "refused" in errors[0] and mlflow_server.uri in errors[0]
    assert "RayTrainWorker" not in proc.stdout + proc.stderr  # no worker started
    assert time.perf_counter() - start < 120


def test_an_unreadable_shard_stops_the_run_naming_its_uri(s3_server, job_env, tmp_path):
    data = f"{s3_server.bucket()}/data"
    _job([str(REPO / "datasets/prepare.py"), "mnist", "--out", data, "--limit", "128",
          "--shard-size", "32"], tmp_path, job_env)
    storage.remove(storage.join(data, "mnist-000002.tar"))
    proc = _job([str(REPO / "jobs/fdrl_mnist.py"), "--data", data, "--storage",
                 f"{s3_server.bucket()}/runs", "--steps", "8", "--batch", "8", "--no-fid",
                 "--flow-steps", "1"], tmp_path, job_env, ok=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert storage.join(data, "mnist-000002.tar") in errors[0]


# ------------------------------------------------------------------------ a lost node survived


def lossy_config(tiny, data: str, runs: str, tracking_uri: str, **overrides) -> TrainConfig:
    """The tiny config for six steps, on the given storage, without a registration."""
    return tiny(data, Path("/unused"), prior="uniform", steps=6, decay_steps=[5], sample_every=10**9,
                max_failures=2, storage=runs, tracking_uri=tracking_uri, register=False, **overrides)


@pytest.fixture(scope="module")
def three_nodes():
    """A head with no CPUs for training (the driver lives there) and two 1-CPU worker nodes."""
    import ray
    import ray._common.utils
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    # Cluster advertises itself in /tmp/ray/ray_current_cluster, where any later ray.init() on
    # the machine (a job another test starts) would find it, dead or alive: withdraw that, and
    # point this process's own "auto" look-ups (Train's State API calls) at it instead.
    ray._common.utils.reset_ray_address()
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous


def test_a_lost_worker_node_is_survived_from_the_bucket(three_nodes, s3_server, tmp_path, train,
                                                        hooks, tiny):
    """Shards and runs on S3, local copies deleted. After the step-2 checkpoint reached the
    bucket, the node of one worker is removed without grace and a fresh node joins: the run
    resumes from the bucket, and its losses after the resume equal an uninterrupted run's."""
    from fdrl.data.writer import convert

    cluster, _ = three_nodes
    local = tmp_path / "local-shards"
    convert("mnist", None, local, shard_size=64, limit=256, progress=False)
    data = f"{s3_server.bucket()}/data"
    storage.put_dir(local, data)
    shutil.rmtree(local)  # the nodes share this disk: prove nothing reads it
    runs = f"{s3_server.bucket()}/runs"
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    straight = train(lossy_config(tiny, data, runs, uri, run_name="straight"))
    marks = tmp_path / "marks"
    lossy = {}

    def run_lossy():  # off the main thread: Cluster.add_node below must run on it
        try:
            lossy["result"] = train(lossy_config(tiny, data, runs, uri, run_name="lossy"),
                                    train_loop=hooks.pauses_at({2}, str(marks)))
        except BaseException as err:
            lossy["error"] = err

    training = threading.Thread(target=run_lossy, daemon=True)
    training.start()
    try:
        deadline = time.monotonic() + 600
        while not list(marks.glob("reached-2-rank1")):  # the condition the run sets
            assert training.is_alive(), f"the run ended before step 2: {lossy}"
            assert time.monotonic() < deadline, "the run never reached step 2"
            time.sleep(0.05)
        # rank 1 reaches step 2 while rank 0 may still be uploading the step-2 checkpoint
        while not storage.glob(storage.join(runs, "lossy"), "checkpoint_[0-9]*"):
            assert time.monotonic() < deadline, "the step-2 checkpoint never reached the bucket"
            time.sleep(0.05)
        node_id = (marks / "reached-2-rank1").read_text()
        node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
        cluster.remove_node(node, allow_graceful=False)
        cluster.add_node(num_cpus=1)  # a fresh node joins, as an autoscaler would add one
    finally:
        (marks / "go-2").write_text("")  # never leave the run waiting
    training.join(timeout=600)
    assert not training.is_alive(), "the run did not end within 600 s of the node loss"
    assert "error" not in lossy, repr(lossy.get("error"))
    resumed = lossy["result"]

    client = MlflowClient(uri)
    before = {m.step: m.value for m in client.get_metric_history(straight.mlflow_run_id, "loss")}
    after: dict[int, list] = {}
    for m in client.get_metric_history(resumed.mlflow_run_id, "loss"):
        after.setdefault(m.step, []).append(m.value)
    print("step  uninterrupted  with a node lost after step 2")
    for step in sorted(before):
        print(f"{step:4d}  {before[step]:+.6f}      {', '.join(f'{v:+.6f}' for v in after[step])}")
    assert sorted(after) == sorted(before) == list(range(1, 7))
    assert all(v == before[step] for step, values in after.items() for v in values)
    assert resumed.checkpoint.startswith("s3://")
