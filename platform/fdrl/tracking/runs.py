"""Housekeeping of MLflow runs that their own process could not close."""

from __future__ import annotations

from typing import Optional

from mlflow.tracking import MlflowClient


def set_status(tracking_uri: str, run_id: str, status: str, tags: Optional[dict] = None) -> None:
    """Terminate ``run_id`` with ``status`` (and ``tags``) unless it already has that status."""
    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status == status:
        return
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, status)
