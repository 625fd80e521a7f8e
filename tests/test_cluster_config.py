"""cluster.yaml: valid for Ray's cluster launcher, no shared disk, no secrets, MLflow private; and
docs/cluster.md: the commands it shows match (s3:// paths, ./dev setup)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster.yaml"
DOCS = ROOT / "docs" / "cluster.md"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _mlflow_command(config) -> str:
    commands = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(commands) == 1, "exactly one head start command runs `mlflow server`"
    return commands[0]


def test_valid_for_the_ray_cluster_launcher(config):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # What `ray up` does before it talks to AWS: fill in the provider's defaults, check again.
    validate_config(prepare_config(config))


def test_every_node_uses_an_instance_role_and_the_security_group(config):
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert node["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert re.fullmatch(r"sg-[0-9a-f]+", node["SecurityGroupIds"][0]), name
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    workers = {t["node_config"]["IamInstanceProfile"]["Arn"]
               for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert head["IamInstanceProfile"]["Arn"] not in workers  # the head's role can launch EC2


def test_no_shared_disk(config):
    text = CONFIG.read_text()
    assert not re.search(r"\befs\b|\bnfs|nfs4|2049|/shared\b", text, re.IGNORECASE)
    commands = " ".join(config["setup_commands"] + config["head_setup_commands"]
                        + config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "mount " not in commands
    assert "s3://YOUR-BUCKET/mlflow" in _mlflow_command(config)


def test_mlflow_server_is_private_authenticated_and_small(config):
    cmd = _mlflow_command(config)
    assert "--app-name basic-auth" in cmd
    assert re.search(r"--backend-store-uri sqlite:///\$HOME/", cmd)  # the head's own disk
    assert "--artifacts-destination s3://" in cmd
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in cmd and "--workers 1" in cmd
    assert '--host "$(hostname -I | awk \'{print $1}\')"' in cmd  # the private address only
    assert "0.0.0.0" not in cmd


def test_no_secret_in_the_file(config):
    text = CONFIG.read_text()
    for pattern in [r"MLFLOW_AUTH_ADMIN_PASSWORD\s*[=:]", r"admin_password",
                    r"MLFLOW_FLASK_SERVER_SECRET_KEY\s*[=:]", r"MLFLOW_TRACKING_PASSWORD",
                    r"AWS_SECRET_ACCESS_KEY", r"aws_secret_access_key", r"AKIA[0-9A-Z]{16}",
                    r"(?i)password\s*[=:]\s*\S"]:
        assert not re.search(pattern, text), pattern
    # Secrets reach the head only through `ray rsync-up`, never through file_mounts (every node).
    assert not any("mlflow-server.env" in f"{k} {v}" for k, v in config["file_mounts"].items())
    assert "~/.fdrl/mlflow-server.env" in _mlflow_command(config)


def test_docs_show_object_storage_commands():
    docs = DOCS.read_text()
    assert "make setup" not in docs and "./dev setup" in docs
    assert "/shared" not in docs and not re.search(r"\bEFS\b|\bNFS\b", docs)
    for snippet in ["--out s3://YOUR-BUCKET/data/celeba", "--storage s3://YOUR-BUCKET/runs",
                    "--data s3://YOUR-BUCKET/data/church", "models:/fdrl-church@candidate",
                    "--runtime-env-json", "MLFLOW_TRACKING_USERNAME", "IamInstanceProfile",
                    "ray rsync-up cluster.yaml"]:
        assert snippet in docs, snippet
    # Every cluster.yaml placeholder is explained in the docs.
    for placeholder in ["YOUR-BUCKET", "ImageId", "IamInstanceProfile", "SecurityGroupIds"]:
        assert placeholder in docs, placeholder


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_head_commands_start_the_mlflow_server(config, s3_server, tmp_path):
    """Run the head's own set-up and MLflow start commands from cluster.yaml here, with HOME in a
    temp folder, the venv linked to ~/fdrl-venv and YOUR-BUCKET on the moto server: the server
    starts from the secrets file, binds the first address of `hostname -I` and wants a password."""
    import requests

    from fdrl.data import storage

    home = tmp_path / "home"
    home.mkdir()
    (home / "fdrl-venv").symlink_to(Path(sys.executable).parents[1])
    bucket = s3_server.bucket()
    env = {**os.environ, "HOME": str(home), "USER": os.environ.get("USER", "root")}
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_S3_ENDPOINT_URL"] = s3_server.endpoint

    def run(cmd: str) -> str:
        cmd = cmd.replace("s3://YOUR-BUCKET", bucket)
        r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    for cmd in config["head_setup_commands"][1:]:  # [0] installs packages: present here
        run(cmd)
    start = _mlflow_command(config)
    assert "NOT started" in run(start)  # no secrets file yet: Ray's start must not fail
    password = "pw-" + os.urandom(12).hex()
    secrets = home / ".fdrl" / "mlflow-server.env"
    secrets.write_text(f"MLFLOW_AUTH_ADMIN_PASSWORD={password}\n"
                       f"MLFLOW_FLASK_SERVER_SECRET_KEY={os.urandom(16).hex()}\n")
    secrets.chmod(0o600)
    host = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
    # MLflow's host check admits private ranges (10.*, 172.16-31.*, 192.168.*) by default; a test
    # address like 192.0.2.x is not one, so requests carry a private Host header as in a VPC.
    headers = {"Host": "10.0.0.1:5000"}
    url = f"http://{host}:5000/api/2.0/mlflow/experiments/search?max_results=1"
    if _status(url, headers) is not None:
        pytest.skip(f"something else listens on {host}:5000, the port cluster.yaml uses")
    pid_file = home / "mlflow" / "server.pid"
    try:
        run(start)
        wait_until = sys.modules["fdrl_test_servers"].wait_until  # loaded by the s3_server fixture
        wait_until(lambda: _status(url, headers) == 401, 180, "MLflow from cluster.yaml",
                   log=home / "mlflow" / "server.log")
        assert requests.get(url, headers=headers, auth=("admin", password), timeout=10).ok
        assert _status(url.replace(host, "127.0.0.1"), headers) is None  # not on loopback
        assert "already running" in run(start)
        assert storage.is_file(str(home / "mlflow" / "basic_auth.db"))
    finally:
        if pid_file.exists():  # the server's process group (setsid), which this test started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def _status(url, headers):
    import requests
    try:
        return requests.get(url, headers=headers, timeout=2).status_code
    except requests.RequestException:
        return None
