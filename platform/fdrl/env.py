"""The environment defaults every entry point needs, set once, before Ray or MLflow start.

``import fdrl`` applies them (``setdefault``: a value the user exported wins).
"""

import os
from pathlib import Path

DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # at Ray's default each report can stall 2 s
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Artifacts travel through the tracking server, which alone holds the bucket's credentials
    # and checks the user's: no presigned URLs straight to the bucket.
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
}


def apply() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def home() -> Path:
    """Where local defaults live (runs, fitted priors, caches, the sqlite MLflow store):
    $FDRL_HOME, else the working directory."""
    return Path(os.environ.get("FDRL_HOME") or os.getcwd()).expanduser().resolve()


def cache_dir() -> Path:
    """This machine's cache of files kept in object storage (priors, FID reference statistics,
    classifier weights): $FDRL_CACHE, else ~/.cache/fdrl."""
    return Path(os.environ.get("FDRL_CACHE") or Path.home() / ".cache" / "fdrl").expanduser().resolve()
