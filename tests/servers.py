"""Real servers for tests, each in its own process on 127.0.0.1 and a free port: a local S3
(moto's standalone server, with IAM authentication on) and an MLflow tracking server with basic
auth whose artifacts go to a bucket on that S3. Both are polled until they answer; nothing sleeps
a fixed time. conftest.py wraps them in the session fixtures ``s3_server`` and ``mlflow_server``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import requests

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` s, or at once if ``proc`` died."""
    deadline, delay = time.monotonic() + timeout, 0.02
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s{_tail(log)}")
        time.sleep(delay)  # a poll interval, not synchronisation: the condition decides
        delay = min(delay * 2, 0.25)


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- last lines of " + str(log) + " ---\n" + "\n".join(
        log.read_text(errors="replace").splitlines()[-lines:])


def _answers(url: str, ok: Callable[[requests.Response], bool] = lambda r: True) -> bool:
    try:
        return ok(requests.get(url, timeout=2))
    except requests.RequestException:
        return False


def _stop_group(proc: subprocess.Popen | None, kill: bool, timeout: float = 30) -> None:
    """Stop the process and its children (it leads its own session, see start_new_session)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _console_script(name: str) -> str:
    """The venv's console script (``mlflow``, ``moto_server``) next to this interpreter."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else (shutil.which(name) or name)


class S3Server:
    """moto's S3 with IAM authentication on: requests need the access key it issued, so a wrong
    secret or an unknown key id fails as on AWS (moto without auth accepts any credentials).

    ``env()`` is what a client needs; the fixture exports it for the session."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.log = self.workdir / "moto.log"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = self.secret_key = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [_console_script("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        wait_until(lambda: _answers(self.endpoint + "/moto-api/"), 60,
                   f"moto server on {self.endpoint}", self.proc, self.log)
        self._enable_auth()
        return self

    def _enable_auth(self) -> None:
        # While moto still accepts anything: one IAM user allowed s3:*, and its access key.
        iam = self._client("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="fdrl-tests")
        iam.put_user_policy(UserName="fdrl-tests", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="fdrl-tests")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        # The body is the number of requests still let through unauthenticated.
        r = requests.post(self.endpoint + "/moto-api/reset-auth", data=b"0", timeout=10,
                          headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()

    def _client(self, service: str, access_key: str | None = None, secret_key: str | None = None):
        import boto3

        # A fresh session: boto3's default one caches the first credentials it saw.
        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            # No instance-metadata lookups when credentials are missing: fail at once, offline.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket (a unique name by default) and return ``s3://name``."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        self._client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"

    def list_uploads(self, bucket: str) -> list[str]:
        """Keys of multipart uploads started and neither completed nor aborted."""
        uploads = self._client("s3").list_multipart_uploads(Bucket=bucket.removeprefix("s3://"))
        return [u["Key"] for u in uploads.get("Uploads", [])]

    def stop(self, kill: bool = True) -> None:
        _stop_group(self.proc, kill)  # in-memory only: nothing to lose by SIGKILL


class MlflowServer:
    """``mlflow server --app-name basic-auth``: sqlite stores in ``workdir``, artifacts proxied to
    ``artifacts`` (an s3:// URI; only the server holds S3 credentials), 2 processes
    (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, --workers 1). The admin password and the Flask
    secret key are generated per instance and passed by environment, never written to a file.

    ``stop(kill=True)`` then ``start()`` restarts it on the same port and databases."""

    admin_user = "admin"

    def __init__(self, workdir: Path, artifacts: str, s3_env: dict[str, str]):
        self.workdir = Path(workdir)
        self.log = self.workdir / "mlflow-server.log"
        self.artifacts = artifacts
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.admin_password = secrets.token_urlsafe(24)
        self._secret_key = secrets.token_hex(32)
        self._s3_env = dict(s3_env)
        self.proc: subprocess.Popen | None = None
        # The auth config: like mlflow/server/auth/basic_auth.ini, with the auth database here.
        self.auth_config = self.workdir / "basic_auth.ini"
        self.auth_config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.workdir / 'basic_auth.db'}\n"
            f"admin_username = {self.admin_user}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
        env.update(self._s3_env)
        env.update({
            "MLFLOW_S3_ENDPOINT_URL": self._s3_env["AWS_ENDPOINT_URL_S3"],
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self._secret_key,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        })
        return env

    def start(self) -> "MlflowServer":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"MLflow server on {self.uri} is already running")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [_console_script("mlflow"), "server", "--app-name", "basic-auth",
                 "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                 "--artifacts-destination", self.artifacts,
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.workdir, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        # /health is outside the auth; a 401 on an API call with no credentials means the auth
        # app (and its admin user) is up too.
        wait_until(lambda: _answers(self.uri + "/health", lambda r: r.status_code == 200)
                   and _answers(self.uri + "/api/2.0/mlflow/experiments/search?max_results=1",
                                lambda r: r.status_code == 401),
                   120, f"MLflow server on {self.uri}", self.proc, self.log)
        return self

    def stop(self, kill: bool = True) -> None:
        """SIGKILL (default) or SIGTERM to the server and its workers; waits until they exit."""
        _stop_group(self.proc, kill)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def create_user(self, name: str, password: str) -> None:
        """A plain (non-admin) user, through the auth REST API as the admin."""
        r = requests.post(self.uri + "/api/2.0/mlflow/users/create",
                          json={"username": name, "password": password},
                          auth=(self.admin_user, self.admin_password), timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"creating MLflow user {name!r}: HTTP {r.status_code} {r.text}")

    @contextlib.contextmanager
    def credentials(self, user: str | None = None,
                    password: str | None = None) -> Iterator[None]:
        """MLFLOW_TRACKING_USERNAME/PASSWORD for a block (the admin's by default); restored after.
        ``user=""`` clears them, for a client without credentials."""
        user = self.admin_user if user is None else user
        password = self.admin_password if password is None and user == self.admin_user else password
        keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        saved = {k: os.environ.get(k) for k in keys}
        try:
            for k, v in zip(keys, (user, password)):
                if v:
                    os.environ[k] = v
                else:
                    os.environ.pop(k, None)
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
