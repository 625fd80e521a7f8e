"""MLflow tracking for training runs that must never stop training.

The training loop (rank 0 of a Ray Train job) owns one :class:`Tracker`. Every tracker call
swallows MLflow / network / database errors: the data is dropped, counted in
``Tracker.dropped`` and reported once per outage on the ``fdrl.tracking`` logger, e.g.::

    MLflow unreachable (ConnectionRefusedError: [Errno 111] Connection refused) at
    http://127.0.0.1:5000: dropped metrics at step 5 (loss, lr); training continues, skipping
    tracking calls for 30s, then retrying

A small circuit breaker keeps a dead server from costing time on every step: after a failure
calls are skipped (and counted as dropped) for ``retry_after_s`` seconds, then tried again.

We use ``MlflowClient`` directly, never the fluent ``mlflow.start_run`` global state, so that
several trackers (e.g. Ray Tune trials and their parent) can coexist in one process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

log = logging.getLogger("fdrl.tracking")

DEFAULT_ROOT_ENV = "FDRL_HOME"

# MLflow's limits (mlflow.utils.validation); copied so importing this module stays cheap.
MAX_PARAM_VAL_LENGTH = 6000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# MLflow retries HTTP requests with exponential backoff (7 retries, ~4 minutes by default) and
# waits up to 120 s per request: a dead server would stall training for minutes per call.
# These values are read per request by mlflow.utils.rest_utils, so setting them in os.environ
# takes effect at once. Tracker sets them only for http(s) URIs and only if the user has not.
FAST_FAIL_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

# Errors that mean "MLflow refused this particular payload" rather than "MLflow is down":
# they drop that payload but must not open the circuit breaker for everything else.
_REJECTION_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
}


def _root(root: Path | None) -> Path:
    if root is None:
        root = Path(os.environ.get(DEFAULT_ROOT_ENV) or os.getcwd())
    return Path(root).expanduser().resolve()


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


def _short(e: BaseException) -> str:
    """'Type: message' of the innermost exception (MLflow wraps e.g. requests' ConnectionError),
    head and tail kept so that both the URL and 'Connection refused' stay visible."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    msg = " ".join(str(e).split())
    if len(msg) > 240:
        msg = msg[:120] + " ... " + msg[-100:]
    return f"{type(e).__name__}: {msg}"


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


class Tracker:
    """Rank-0 MLflow run that never raises into the training loop.

    Every method swallows MLflow / network errors, warns once per failure burst naming what was
    dropped, counts drops in ``self.dropped`` (kind -> number of items: metric values, params,
    tags, artifacts, ...) and keeps trying: after a failure, calls are skipped (counted as
    dropped) for ``retry_after_s`` seconds, then tried again.

    ``run_id`` resumes that run (a resumed training continues the same run); ``parent_run_id``
    makes a nested child run. ``enabled=False`` gives a no-op tracker (non-zero ranks) that
    touches no backend. If MLflow is unreachable at start, ``run_id`` stays None and every
    call is dropped and counted.

    For http(s) tracking URIs this sets :data:`FAST_FAIL_HTTP_ENV` in ``os.environ`` (process
    wide, only for variables the user has not set) so a dead server costs seconds, not minutes.
    """

    def __init__(self, experiment: str, run_name: str | None = None,
                 tracking_uri: str | None = None, run_id: str | None = None,
                 tags: dict | None = None, enabled: bool = True,
                 parent_run_id: str | None = None, retry_after_s: float = 30.0,
                 clock=time.monotonic):
        self.enabled = enabled
        self._clock = clock  # the breaker's time source; tests pass one they advance themselves
        self.attempts = 0  # calls that reached MLflow (the breaker skips the rest)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.retry_after_s = retry_after_s
        self.dropped: dict[str, int] = {}
        self._dropped_steps: list[int] = []   # [min, max] step of dropped metrics
        self._down_since: float | None = None  # None: healthy (breaker closed)
        self._retry_at = 0.0
        self._burst_drops = 0
        self._ended = False
        self._rejected_kinds: set[str] = set()  # rejections are warned once per kind
        self.client = None
        if not enabled:
            return
        self.tracking_uri = tracking_uri or default_tracking_uri()
        if _is_http(self.tracking_uri):
            for k, v in FAST_FAIL_HTTP_ENV.items():
                os.environ.setdefault(k, v)
        self._call("run", f"run start in experiment {experiment!r}",
                   lambda: self._start(experiment, run_name, run_id, tags, parent_run_id))

    def _start(self, experiment, run_name, run_id, tags, parent_run_id):
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        if run_id is not None:
            run = self.client.get_run(run_id)  # raises if it does not exist
            if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                self.client.update_run(run_id, status="RUNNING")
            self.experiment_id, self.run_id = run.info.experiment_id, run_id
            if tags:
                self.set_tags(tags)
            return
        self.experiment_id = ensure_experiment(experiment, self.tracking_uri)
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        commit = git_commit()
        if commit:
            all_tags.setdefault("mlflow.source.git.commit", commit)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id

    # -- failure handling -------------------------------------------------------------------

    def _drop(self, kind: str, n: int, step: int | None = None) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + n
        self._burst_drops += n
        if step is not None:
            lo, hi = self._dropped_steps or (step, step)
            self._dropped_steps = [min(lo, step), max(hi, step)]

    def _call(self, kind: str, what: str, fn, n: int = 1, step: int | None = None) -> bool:
        """Run fn() unless disabled / no run / breaker open; never raises. Returns success."""
        if not self.enabled:
            return False
        now = self._clock()
        if (kind != "run" and self.run_id is None) or now < self._retry_at:
            self._drop(kind, n, step)
            log.debug("MLflow tracking: skipped %s", what)
            return False
        self.attempts += 1
        try:
            fn()
        except Exception as e:
            self._drop(kind, n, step)
            tail = " without tracking (every call is dropped and counted)" if kind == "run" else ""
            code = getattr(e, "error_code", None)
            if code in _REJECTION_CODES or isinstance(e, (ValueError, TypeError)):
                # MLflow is up but refused this payload: drop it only, keep the breaker closed.
                level = logging.DEBUG if kind in self._rejected_kinds else logging.WARNING
                self._rejected_kinds.add(kind)
                log.log(level, "MLflow rejected %s (%s): dropped; training continues%s",
                        what, _short(e), tail)
                return False
            self._retry_at = self._clock() + self.retry_after_s
            if self._down_since is None:  # first failure of a burst: say what is lost
                self._down_since = now
                tail = tail or (f", skipping tracking calls for {self.retry_after_s:g}s, "
                                "then retrying")
                log.warning("MLflow unreachable (%s) at %s: dropped %s; training continues%s",
                            _short(e), self.tracking_uri, what, tail)
            else:
                log.debug("MLflow still unreachable: dropped %s", what)
            return False
        if self._down_since is not None:
            log.warning("MLflow reachable again after %.0fs; %d items were dropped meanwhile",
                        now - self._down_since, self._burst_drops)
            self._down_since = None
        self._burst_drops = 0
        return True

    # -- logging API ------------------------------------------------------------------------

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        keys = ", ".join(list(flat)[:5]) + (", ..." if len(flat) > 5 else "")
        ps = [Param(k, v) for k, v in flat.items()]

        def fn():
            for chunk in _chunks(ps, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=chunk, synchronous=True)
        self._call("params", f"{len(ps)} params ({keys})", fn, n=len(ps))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        keys = ", ".join(list(metrics)[:5]) + (", ..." if len(metrics) > 5 else "")

        def fn():
            ts = int(time.time() * 1000)
            ms = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
            for chunk in _chunks(ms, MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
        self._call("metrics", f"metrics at step {step} ({keys})", fn, n=len(metrics), step=step)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        ts = [RunTag(k, str(v)) for k, v in tags.items()]

        def fn():
            for chunk in _chunks(ts, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=chunk, synchronous=True)
        self._call("tags", f"tags ({', '.join(tags)})", fn, n=len(ts))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(local_path)

        def fn():
            log_fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
            log_fn(self.run_id, str(p), artifact_path)
        self._call("artifacts", f"artifact {p.name}", fn)

    def log_dict(self, d: dict, artifact_file: str) -> None:
        self._call("artifacts", f"artifact {artifact_file}",
                   lambda: self.client.log_dict(self.run_id, d, artifact_file))

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run (idempotent) and summarise everything dropped, if anything."""
        if not self.enabled or self._ended:
            return
        self._ended = True
        # A final attempt even if the breaker is open: the run should not stay RUNNING.
        self._retry_at = 0.0
        if self.run_id is not None:
            self._call("end", f"end of run (status {status})",
                       lambda: self.client.set_terminated(self.run_id, status))
        if self.dropped:
            parts = []
            for kind, n in self.dropped.items():
                if kind == "metrics":
                    kind = "metric values (steps {}..{})".format(*self._dropped_steps)
                elif kind == "run":
                    kind = "run start"
                parts.append(f"{n} {kind}")
            run = f"run {self.run_id}" if self.run_id else "a run that could not be started"
            log.warning("MLflow tracking dropped %s for %s; training was not affected",
                        ", ".join(parts), run)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
