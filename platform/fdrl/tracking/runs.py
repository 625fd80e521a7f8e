"""Housekeeping of MLflow runs: can this process write runs there, and closing runs that their
own process could not close."""

from __future__ import annotations

import re
import time
from typing import Optional

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


class TrackingAccessError(PermissionError):
    """The tracking server refused these credentials (401/403)."""


class TrackingUnreachableError(ConnectionError):
    """No tracking server answered at the URI."""


def check_access(tracking_uri: str, experiment: str) -> None:
    """Raise ``TrackingAccessError`` or ``TrackingUnreachableError`` naming the server unless this
    process can write runs of ``experiment`` there: it creates the experiment when missing and
    sets a tag on it, the smallest write the server checks permissions for."""
    from fdrl.tracking.backend import ensure_experiment, set_fast_fail_env

    set_fast_fail_env(tracking_uri)
    try:
        experiment_id = ensure_experiment(experiment, tracking_uri)
        if tracking_uri.startswith(("http://", "https://")):  # a server checks permissions
            MlflowClient(tracking_uri).set_experiment_tag(experiment_id, "fdrl.last_write_check",
                                                          str(int(time.time())))
    except MlflowException as err:
        if re.search(r"\b(401|403)\b", str(err)) or "PERMISSION_DENIED" in str(err) \
                or getattr(err, "error_code", "") in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise TrackingAccessError(
                f"MLflow at {tracking_uri} refused to let this user write runs of experiment "
                f"{experiment!r} ({_first_line(err)}): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to a user with EDIT permission") from None
        if _no_answer(err):
            raise TrackingUnreachableError(_unreachable(tracking_uri, err)) from None
        # It answered, with another complaint (say two jobs writing the same tag at once): the
        # server is there and lets this user in, which is what is checked here.
    except OSError as err:  # requests' connection errors are OSErrors
        raise TrackingUnreachableError(_unreachable(tracking_uri, err)) from None


def _no_answer(err: BaseException) -> bool:
    """Whether an MLflow error means no server answered (as opposed to an answer refusing)."""
    text = str(err)
    return any(s in text for s in ("Connection refused", "Max retries exceeded",
                                   "Failed to establish a new connection", "timed out",
                                   "Name or service not known", "Temporary failure in name"))


def _unreachable(uri: str, err: BaseException) -> str:
    return (f"MLflow at {uri} is unreachable ({type(err).__name__}: {_first_line(err)}): start "
            "the server or fix --tracking-uri, or pass --tracking-offline to train now and log "
            "when it answers")


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] if text else type(err).__name__


def set_status(tracking_uri: str, run_id: str, status: str, tags: Optional[dict] = None) -> None:
    """Terminate ``run_id`` with ``status`` (and ``tags``) unless it already has that status."""
    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status == status:
        return
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, status)
