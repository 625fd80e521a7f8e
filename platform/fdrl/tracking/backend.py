"""Where MLflow runs go, and the little every MLflow caller needs first: the default tracking
URI (sqlite under $FDRL_HOME), experiments created with an explicit artifact location, the git
commit, flattened params, and fail-fast HTTP settings."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fdrl.env import home


SPOOL_ROOT = ".fdrl-spool"

# MLflow's param value limit (mlflow.utils.validation); copied so importing this stays cheap.
MAX_PARAM_VAL_LENGTH = 6000

# MLflow retries HTTP requests with exponential backoff (7 retries, ~4 minutes by default) and
# waits up to 120 s per request: the shipper would sit in one request for minutes instead of
# backing off on its own terms (and end() would wait that long). These values are read per
# request by mlflow.utils.rest_utils, so setting them in os.environ takes effect at once.
# Tracker sets them only for http(s) URIs and only if the user has not.
FAST_FAIL_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def _root(root: Path | None) -> Path:
    return home() if root is None else Path(root).expanduser().resolve()


def default_tracking_uri(root: Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite db at <root>/mlflow.db (root: arg, $FDRL_HOME or cwd).

    sqlite, because MLflow 3 refuses the plain file store (./mlruns)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{_root(root)}/mlflow.db"


def default_artifact_root(root: Path | None = None) -> str:
    """<root>/mlartifacts as a file URI (root: arg, $FDRL_HOME or cwd)."""
    return (_root(root) / "mlartifacts").as_uri()


def _sqlite_dir(tracking_uri: str) -> Path | None:
    """Directory of the db file of a sqlite:////abs/path URI, else None."""
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):]
        if path and path != ":memory:":
            return Path(path).parent
    return None


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ensure_experiment(name: str, tracking_uri: str | None = None,
                      artifact_root: str | None = None) -> str:
    """Get or create experiment ``name``; returns its id.

    On creation the artifact location is set explicitly to <artifact_root>/<name> (MLflow would
    otherwise default to <cwd>/mlruns). Without ``artifact_root``: artifacts go next to a sqlite
    db (<db dir>/mlartifacts), a tracking server chooses its own (--default-artifact-root), and
    any other backend uses :func:`default_artifact_root`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking_uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":  # runs cannot be created in a deleted experiment
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    if artifact_root is None and not _is_http(tracking_uri):
        artifact_root = default_artifact_root(_sqlite_dir(tracking_uri))
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:  # another process created it between our get and create
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def git_commit(path: Path | None = None) -> str | None:
    """Commit of the git repo containing ``path`` (or cwd); None outside git or without git."""
    path = Path(path) if path is not None else Path.cwd()
    if path.is_file():
        path = path.parent
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def flatten_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{"opt": {"lr": 1e-3}, "dims": [2, 3]} -> {"opt.lr": "0.001", "dims.0": "2", "dims.1": "3"};
    values truncated to MLflow's param length limit (longer values are rejected by MLflow)."""
    out: dict[str, str] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list, tuple)) and len(v) > 0:
            out.update(flatten_params(v, prefix=key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_VAL_LENGTH]
    return out


def set_fast_fail_env(tracking_uri: str) -> None:
    """:data:`FAST_FAIL_HTTP_ENV` into os.environ (unless set) for an http(s) tracking URI."""
    if _is_http(tracking_uri):
        for k, v in FAST_FAIL_HTTP_ENV.items():
            os.environ.setdefault(k, v)


