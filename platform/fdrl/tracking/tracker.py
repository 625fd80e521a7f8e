"""MLflow tracking for training runs that must never stop training, and lose nothing.

The training loop (rank 0 of a Ray Train job) owns one :class:`Tracker`. Every call is first
appended to a spool on local disk (:mod:`fdrl.tracking.spool`, fsynced) and returns; one
background thread ships the spool to MLflow in order (:mod:`fdrl.tracking.shipper`). While
MLflow is unreachable the records wait in the spool and the shipper retries with a bounded
backoff; when it is back, everything is replayed, without duplicates. A run started while
MLflow is down is created when it comes back (``run_id`` is None until then:
:meth:`Tracker.wait_for_run`). What is still unshipped at :meth:`Tracker.end` stays in the
spool, named in one warning, for ``python -m fdrl.tracking.replay SPOOL_DIR`` or for a tracker
that reopens the spool (``Tracker(..., spool_dir=SPOOL_DIR)``, e.g. a resumed training).

We use ``MlflowClient`` directly, never the fluent ``mlflow.start_run`` global state, so that
several trackers (e.g. Ray Tune trials and their parent) can coexist in one process.
"""

from __future__ import annotations

import logging
import shutil
import uuid
import weakref
from pathlib import Path

from fdrl.tracking.backend import (FAST_FAIL_HTTP_ENV, SPOOL_ROOT, _is_http, _root,  # noqa: F401
                                   default_artifact_root, default_tracking_uri, ensure_experiment,
                                   flatten_params, git_commit, set_fast_fail_env)
from fdrl.tracking.shipper import KINDS, Shipper, describe
from fdrl.tracking.spool import Spool

log = logging.getLogger("fdrl.tracking")

def _release(shipper: Shipper, spool: Spool, remove: bool) -> None:
    """A tracker dropped (or the interpreter exiting) without end(): stop its idle shipper and
    release the spool (removing a default one) if everything is shipped; else leave both, the
    spool holding the rest for a replay. Module-level: it must not keep the tracker alive."""
    if spool.acked >= spool.last_seq and shipper.stop(timeout=1.0):
        spool.close()
        if remove:
            shutil.rmtree(spool.path, ignore_errors=True)


class Tracker:
    """Rank-0 MLflow run that never raises into the training loop and loses nothing.

    Args:
        experiment: experiment of a new run (created if missing).
        run_name, tags, parent_run_id: of a new run (``parent_run_id`` nests it).
        tracking_uri: default :func:`default_tracking_uri`.
        run_id: log into this existing run (a resumed training) instead of creating one.
        enabled: False gives a no-op tracker (non-zero ranks) that touches no disk or backend.
        spool_dir: the spool folder. A folder that already holds a spool is reopened and
            continued: its run (created, or to be created) is resumed, the arguments above
            except ``tags`` are then ignored. Default: ``$FDRL_HOME`` (else the working
            directory) ``/.fdrl-spool/<uuid>``, deleted once fully shipped at :meth:`end`.
        follow_spool: log into the run that the tracker owning that spool creates (e.g. a Ray
            Train worker following the driver's spool on shared storage); this tracker waits
            for its run id and never ends the run.
        on_run_id: called with the run id once the run exists (on the shipper thread).
        start_timeout: the constructor waits up to this long for the first attempt to ship
            (so ``run_id`` is known at once when MLflow is up; a down server fails fast).
        end_timeout: the longest :meth:`end` waits for a healthy MLflow to take the rest.
        max_backoff_s: the longest wait between two attempts while MLflow is unreachable.
        keep_spool: keep the spool folder after a complete :meth:`end`; default: keep it iff
            ``spool_dir`` was given (its owner may reopen it).

    For http(s) tracking URIs this sets :data:`FAST_FAIL_HTTP_ENV` in ``os.environ`` (process
    wide, only for variables the user has not set). ``dropped`` counts the items lost for good
    (kind -> number of metric values, params, tags, artifacts, ...): rejected by MLflow, or
    not spoolable (disk full, a missing file, a value that is not a number); each kind is
    warned about once.
    """

    def __init__(self, experiment: str, run_name: str | None = None,
                 tracking_uri: str | None = None, run_id: str | None = None,
                 tags: dict | None = None, enabled: bool = True,
                 parent_run_id: str | None = None, spool_dir: str | Path | None = None,
                 follow_spool: str | Path | None = None, on_run_id=None,
                 start_timeout: float = 60.0, end_timeout: float = 300.0,
                 max_backoff_s: float = 15.0, keep_spool: bool | None = None):
        self.enabled = enabled
        self.run_id: str | None = None
        self.spool_dir: Path | None = None
        self.end_timeout = end_timeout
        self._spool: Spool | None = None
        self._shipper: Shipper | None = None
        self._ended = False
        self._dropped: dict[str, int] = {}  # items that could not be spooled
        self._warned: set[str] = set()
        self._on_run_id = on_run_id
        if not enabled:
            return
        self.tracking_uri = tracking_uri or default_tracking_uri()
        given = spool_dir is not None
        self._keep_spool = given if keep_spool is None else keep_spool
        if not given:
            spool_dir = _root(None) / SPOOL_ROOT / uuid.uuid4().hex
        tags = {k: str(v) for k, v in (tags or {}).items()}
        try:
            self._spool = Spool(spool_dir)  # SpoolError (a live owner holds it) propagates
            if self._spool.last_seq:
                self._reopen(run_id, tags)
            else:
                self._start(experiment, run_name, run_id, tags, parent_run_id, follow_spool)
        except OSError as e:  # no writable disk: a tracker without tracking beats no training
            log.warning("MLflow tracking disabled: cannot write the spool %s (%s); training "
                        "continues untracked", spool_dir, e)
            if self._spool is not None:
                self._spool.close()
            self.enabled, self._spool = False, None
            return
        self.spool_dir = self._spool.path
        set_fast_fail_env(self.tracking_uri)
        self.run_id = self._spool.run_id or self.run_id
        known = weakref.WeakMethod(self._run_known)  # the thread must not keep self alive
        self._shipper = Shipper(self._spool, self.tracking_uri, max_backoff_s=max_backoff_s,
                                on_run_id=lambda run_id: known() and known()(run_id))
        self._shipper.start()
        self._finalizer = weakref.finalize(self, _release, self._shipper, self._spool,
                                           not self._keep_spool)
        if start_timeout:
            self._shipper.first_attempt.wait(start_timeout)

    def _start(self, experiment, run_name, run_id, tags, parent_run_id, follow_spool) -> None:
        record = {"tracking_uri": self.tracking_uri, "tags": tags}
        if follow_spool is not None:
            record["follow"] = str(Path(follow_spool).expanduser().resolve())
        elif run_id is not None:
            record["run_id"] = self.run_id = run_id
        else:
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            commit = git_commit()
            if commit:
                tags.setdefault("mlflow.source.git.commit", commit)
            record.update(experiment=experiment, run_name=run_name, spool_id=uuid.uuid4().hex)
        self._spool.append("run", **record)

    def _reopen(self, run_id, tags) -> None:
        first = self._spool.read(0, 1)[0][0]
        known = self._spool.run_id or first.get("run_id")
        if run_id and known and run_id != known:
            log.warning("spool %s belongs to run %s: reopened it, ignoring run_id=%s",
                        self._spool.path, known, run_id)
        if first.get("tracking_uri") and first["tracking_uri"] != self.tracking_uri:
            log.warning("spool %s ships to %s, where its run lives: ignoring tracking_uri=%s",
                        self._spool.path, first["tracking_uri"], self.tracking_uri)
            self.tracking_uri = first["tracking_uri"]
        self.run_id = known
        self._spool.append("reopen", tags=tags)

    def _run_known(self, run_id: str) -> None:
        self.run_id = run_id
        if self._on_run_id is not None:
            self._on_run_id(run_id)

    # -- logging API (each call appends one record; never raises) ----------------------------

    def _append(self, op: str, what: str, n: int = 1, files_from: Path | None = None,
                **fields) -> None:
        if not self.enabled:
            return
        if self._ended:
            return self._drop(op, n, what, "called after end()")
        try:
            self._spool.append(op, files_from=files_from, **fields)
        except Exception as e:  # disk full, an unserialisable value, a vanished file, ...
            return self._drop(op, n, what, f"could not spool it: {type(e).__name__}: {e}")
        self._shipper.notify()

    def _drop(self, op: str, n: int, what: str, why: str) -> None:
        kind = KINDS[op]
        self._dropped[kind] = self._dropped.get(kind, 0) + n
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, "MLflow tracking dropped %s (%s); training continues", what, why)

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        try:
            flat = flatten_params(params)
        except Exception as e:
            return self._drop("params", 1, "params", f"{type(e).__name__}: {e}")
        if flat:
            keys = ", ".join(list(flat)[:5]) + (", ..." if len(flat) > 5 else "")
            self._append("params", f"{len(flat)} params ({keys})", len(flat), params=flat)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        values = {}
        for k, v in metrics.items():
            try:
                values[str(k)] = float(v)
            except (TypeError, ValueError) as e:
                self._drop("metrics", 1, f"metric {k!r} at step {step}", f"not a number: {e}")
        if values:
            self._append("metrics", f"metrics at step {step} ({', '.join(list(values)[:5])})",
                         len(values), metrics=values, step=int(step))

    def set_tags(self, tags: dict) -> None:
        self._append("tags", f"tags ({', '.join(map(str, tags))})", len(tags),
                     tags={str(k): str(v) for k, v in tags.items()})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copies ``local_path`` (a file, or a folder whose contents are logged) into the
        spool now; it may change or vanish afterwards."""
        p = Path(local_path)
        self._append("artifact", f"artifact {p}", files_from=p, artifact_path=artifact_path)

    def log_dict(self, d: dict, artifact_file: str) -> None:
        self._append("dict", f"artifact {artifact_file}", dict=d, artifact_file=artifact_file)

    # -- waiting and ending ------------------------------------------------------------------

    @property
    def experiment_id(self) -> str | None:
        return self._spool.state.get("experiment_id") if self._spool else None

    @property
    def pending(self) -> int:
        """Records spooled but not shipped yet."""
        return self._shipper.pending if self._shipper else 0

    @property
    def dropped(self) -> dict[str, int]:
        """Items lost for good: not spooled (see the warnings) or rejected by MLflow."""
        out = dict(self._dropped)
        for kind, n in (self._shipper.dropped if self._shipper else {}).items():
            out[kind] = out.get(kind, 0) + n
        return out

    def wait_for_run(self, timeout: float | None = None) -> str | None:
        """The run id once the run exists in MLflow; None after ``timeout`` seconds, if MLflow
        refused the run, or for a disabled tracker."""
        if self._shipper is None or self.run_id is not None:
            return self.run_id
        self._shipper.kick()
        self._shipper.wait_for(lambda: self.run_id is not None or self._shipper.blocked
                               or not self._shipper.alive, timeout)
        return self.run_id

    def drain(self, timeout: float | None = None) -> bool:
        """Block until everything spooled so far is shipped (True), or ``timeout`` seconds have
        passed or shipping cannot go on (False)."""
        if self._shipper is None:
            return True
        self._shipper.kick()
        return self._shipper.wait_shipped(self._spool.last_seq, timeout)

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Spool the end of the run (idempotent), wait for the spool to drain, stop the shipper.

        ``timeout=None`` waits while MLflow answers: until everything is shipped, until an
        attempt after this call finds MLflow unreachable (a dead server is not waited for), or
        ``end_timeout`` seconds. A number waits up to that long even while MLflow is down (to
        ride out a restart); 0 does not wait. What is not shipped then stays in the spool,
        named in one warning with the command that ships it later."""
        if not self.enabled or self._ended:
            return
        self._append("end", f"end of run (status {status})", status=status)
        self._ended = True
        self._finalizer.detach()
        shipper, spool = self._shipper, self._spool
        if timeout is None:
            failures = shipper.failures
            shipper.kick()
            shipper.wait_for(lambda: spool.acked >= spool.last_seq or shipper.failures > failures
                             or shipper.blocked is not None or not shipper.alive, self.end_timeout)
            shipped = spool.acked >= spool.last_seq
        else:
            shipped = self.drain(timeout)
        stopped = shipper.stop(timeout=5.0)  # bounded: a request in flight may still time out
        if not shipped:
            why = shipper.blocked or f"MLflow at {self.tracking_uri} unreachable"
            log.warning(
                "MLflow tracking: %s not shipped (%s); kept in spool %s. Ship them later with "
                "`python -m fdrl.tracking.replay %s`, or reopen the spool with "
                "Tracker(..., spool_dir=...)", describe(spool.pending()), why, spool.path, spool.path)
        if self.dropped:
            run = f"run {self.run_id}" if self.run_id else "a run that was never created"
            log.warning("MLflow tracking dropped %s for %s; training was not affected",
                        ", ".join(f"{n} {k}" for k, n in self.dropped.items()), run)
        if stopped:  # else the thread still holds the spool; it ends with the process
            spool.close()
            if shipped and not self._keep_spool:
                shutil.rmtree(spool.path, ignore_errors=True)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
