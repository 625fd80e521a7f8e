"""Ships a spool's records to MLflow, in order, from one background thread.

What is shipped is acknowledged in the spool's state file after MLflow has accepted it, so a
shipper that dies (or a process that is killed) between sending and acknowledging resends
that one batch later. Every record is therefore shipped so that sending it twice changes
nothing:

- metrics carry the timestamp of the tracker call, fixed in the journal. MLflow's SQL store
  (sqlite, or the database behind ``mlflow server``: the stores this project tracks into) has
  (run, key, timestamp, step, value, is_nan) as the metrics table's primary key and skips an
  identical point on insert (SqlAlchemyStore._log_metrics), so a resent batch adds nothing.
  Only a new timestamp makes a duplicate, which is what the old tracker did on every attempt.
  We chose this over reading the run's metric history before a resend: it costs no request,
  has no window between the check and the send, and does not grow with the run's history.
  (A store without that key, e.g. Databricks', would need the history check.)
- params: re-logging a param with the same value is accepted and changes nothing; tags,
  artifacts, log_dict files and the terminal status are overwritten with the same content.
- the run itself: the create record carries a random spool id, set as tag ``fdrl.spool`` on
  the run. Before creating, the shipper looks for a run with that tag and adopts it, so a run
  created by an attempt whose answer was lost is not created twice.

Errors are sorted in two. MLflow refusing this payload (an error code in REJECTION_CODES, e.g.
INVALID_PARAMETER_VALUE for a changed param, or a client-side ValueError) drops that record
with one warning per kind. Anything else means "not now": connection refused, timeouts, 5xx,
a locked sqlite db, and also 401/403/429 or an unknown endpoint, which a fixed token or URL
cures; the record stays and the shipper backs off (0.5 s doubling up to ``max_backoff_s``).
"""

from __future__ import annotations

import json
import logging
import threading
import time

from fdrl.tracking.spool import Spool, read_state

log = logging.getLogger("fdrl.tracking")

SPOOL_TAG = "fdrl.spool"

# MLflow's limits (mlflow.utils.validation); copied so importing this module stays cheap.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
READ_AHEAD = 1000  # records read from the journal per step

# Error codes meaning "MLflow refused this particular payload" rather than "MLflow is down".
REJECTION_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
}

SHIPPED, IDLE, DOWN, BLOCKED = "shipped", "idle", "down", "blocked"
_BATCHED = ("params", "metrics", "tags")
KINDS = {"run": "run start", "reopen": "run reopen", "params": "params", "metrics": "metrics",
         "tags": "tags", "artifact": "artifacts", "dict": "artifacts", "end": "end",
         "corrupt": "corrupt records"}


class RunNotKnownYet(Exception):
    """A following spool's run has not been created yet by the spool it follows."""


def is_rejection(e: BaseException) -> bool:
    code = getattr(e, "error_code", None)
    if code is not None:
        return code in REJECTION_CODES
    # Client-side validation; a JSON decoding error is a broken answer (a proxy's error page).
    return (isinstance(e, (ValueError, TypeError))
            and not isinstance(e, (json.JSONDecodeError, UnicodeError)))


def short_error(e: BaseException) -> str:
    """'Type: message' of the innermost exception (MLflow wraps e.g. requests' ConnectionError),
    head and tail kept so that both the URL and 'Connection refused' stay visible."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    msg = " ".join(str(e).split())
    if len(msg) > 240:
        msg = msg[:120] + " ... " + msg[-100:]
    return f"{type(e).__name__}: {msg}"


def items(rec: dict) -> int:
    """Items in a record: its params, metric values or tags; 1 for anything else."""
    op = rec.get("op")
    return len(rec.get(op, {})) if op in _BATCHED else 1


def describe(records: list[dict]) -> str:
    """'80 metric values (steps 0..39), 1 params (lr), 1 artifacts, the end of the run'."""
    counts: dict[str, int] = {}
    keys: dict[str, list[str]] = {}
    steps = [r["step"] for r in records if r.get("op") == "metrics"]
    for r in records:
        kind = KINDS.get(r.get("op"), r.get("op"))
        counts[kind] = counts.get(kind, 0) + items(r)
        if r.get("op") in ("params", "tags"):
            keys.setdefault(kind, []).extend(r[r["op"]])
    parts = []
    for kind, n in counts.items():
        if kind == "metrics":
            kind = f"metric values (steps {min(steps)}..{max(steps)})"
        elif kind == "end":
            parts.append("the end of the run")
            continue
        elif kind in keys:
            names = list(dict.fromkeys(keys[kind]))
            kind += f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        parts.append(f"{n} {kind}")
    return ", ".join(parts) or "nothing"


class Shipper:
    """Ships ``spool`` to ``tracking_uri`` (default: the one its run record names).

    ``step()`` ships the next batch; ``start()`` runs steps on a daemon thread until ``stop()``,
    backing off while MLflow is unreachable. ``on_run_id(run_id)`` is called (on that thread)
    once the run exists. Counts of rejected items per kind are in ``dropped``."""

    def __init__(self, spool: Spool, tracking_uri: str | None = None, on_run_id=None,
                 max_backoff_s: float = 15.0, min_backoff_s: float = 0.5):
        self.spool = spool
        self.tracking_uri = tracking_uri
        self.on_run_id = on_run_id
        self.max_backoff_s = max_backoff_s
        self.min_backoff_s = min_backoff_s
        self.dropped: dict[str, int] = {}
        self.blocked: str | None = None  # why the run cannot be opened: shipping has stopped
        self.attempts = 0  # steps that sent something (or tried to)
        self.failures = 0  # attempts that found MLflow unreachable (or the followed run unknown)
        self.first_attempt = threading.Event()
        self._client = None
        self._first_record: dict | None = None
        # After a rejected batch, the records up to _split_until go in batches of at most
        # _split records, halved on each rejection and doubled on each success: the refused
        # record is found, and the rest shipped, in O(log n) requests.
        self._split_until, self._split = 0, 0
        self._rejected_kinds: set[str] = set()
        self._down_since: float | None = None
        self._waiting_logged = False
        self._cond = threading.Condition()
        self._stop = self._kicked = False
        self._thread: threading.Thread | None = None

    # -- shipping -----------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self.spool.run_id

    def step(self) -> str:
        """Ship the next batch: SHIPPED (progress), IDLE (all shipped), DOWN (try again later)
        or BLOCKED (the run cannot be created or opened; see ``blocked``)."""
        if self.blocked:
            return BLOCKED
        records = self.spool.read(self.spool.state.get("offset", 0), READ_AHEAD)
        if not records:
            self.first_attempt.set()
            return IDLE
        batch = self._take(records)
        self.attempts += 1
        try:
            fields = self._ship([r for r, _ in batch])
        except Exception as e:
            status = self._failed(e, batch)
        else:
            self._up()
            self._ack(batch, fields or {})
            self._split = min(self._split * 2, READ_AHEAD)
            status = SHIPPED
        self.first_attempt.set()  # after the ack: a waiter then sees the run id
        return status

    def _take(self, records: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
        """The leading records that go in one request: consecutive params/metrics/tags within
        MLflow's batch limits, without two values for one param or tag key (their order would
        be lost); any other record alone."""
        first = records[0][0]
        if first["op"] not in _BATCHED:
            return records[:1]
        cap = self._split if first["seq"] <= self._split_until else len(records)
        n_metrics = n_pt = 0
        keys: set[tuple[str, str]] = set()
        out = []
        for rec, end in records:
            if rec["op"] not in _BATCHED or len(out) == cap:
                break
            m, p, t = rec.get("metrics", {}), rec.get("params", {}), rec.get("tags", {})
            new_keys = {("p", k) for k in p} | {("t", k) for k in t}
            if out and (n_metrics + len(m) > MAX_METRICS_PER_BATCH
                        or n_pt + len(p) + len(t) > MAX_PARAMS_TAGS_PER_BATCH
                        or keys & new_keys):
                break
            n_metrics, n_pt = n_metrics + len(m), n_pt + len(p) + len(t)
            keys |= new_keys
            out.append((rec, end))
        return out

    def _ship(self, batch: list[dict]) -> dict | None:
        """Send ``batch``; returns fields for the state file (run and experiment ids)."""
        op = batch[0]["op"]
        if op == "run":
            return self._open_run(batch[0])
        if op == "corrupt":
            raise ValueError(f"unreadable journal line: {batch[0]['line']!r}")
        run_id = self.run_id
        client = self._mlflow()
        if op in _BATCHED:
            self._log_batch(client, run_id, batch)
        elif op == "reopen":
            if not self._following():  # the followed spool's owner runs the run's status
                client.update_run(run_id, status="RUNNING")
            self._log_batch(client, run_id, batch)
        elif op == "artifact":
            path = self.spool.path / batch[0]["file"]
            if not path.exists():
                raise ValueError(f"the spooled copy {path} is gone")
            if path.is_dir():
                client.log_artifacts(run_id, str(path), batch[0].get("artifact_path"))
            else:
                client.log_artifact(run_id, str(path), batch[0].get("artifact_path"))
        elif op == "dict":
            client.log_dict(run_id, batch[0]["dict"], batch[0]["artifact_file"])
        elif op == "end":
            if not self._following():
                client.set_terminated(run_id, batch[0]["status"], end_time=batch[0]["t"])
        else:
            raise ValueError(f"unknown journal op {op!r}")
        return None

    def _log_batch(self, client, run_id: str, batch: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(k, float(v), r["t"], int(r["step"]))
                   for r in batch for k, v in r.get("metrics", {}).items()]
        params = [Param(k, v) for r in batch for k, v in r.get("params", {}).items()]
        tags = [RunTag(k, v) for r in batch for k, v in r.get("tags", {}).items()]
        while metrics or params or tags:  # one record may exceed a limit: chunk it
            p = params[:MAX_PARAMS_TAGS_PER_BATCH]
            t = tags[:MAX_PARAMS_TAGS_PER_BATCH - len(p)]
            m = metrics[:min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(p) - len(t))]
            client.log_batch(run_id, metrics=m, params=p, tags=t, synchronous=True)
            metrics, params, tags = metrics[len(m):], params[len(p):], tags[len(t):]

    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri())
        return self._client

    def _first(self) -> dict:
        if self._first_record is None:
            first = self.spool.read(0, 1)
            self._first_record = first[0][0] if first else {}
        return self._first_record

    def uri(self) -> str:
        if not self.tracking_uri:
            from fdrl.tracking.backend import default_tracking_uri

            self.tracking_uri = self._first().get("tracking_uri") or default_tracking_uri()
        return self.tracking_uri

    def _following(self) -> bool:
        return bool(self._first().get("follow"))

    def _open_run(self, rec: dict) -> dict:
        from fdrl.tracking.backend import ensure_experiment

        client = self._mlflow()
        tags = rec.get("tags") or {}
        if rec.get("follow") or rec.get("run_id"):
            run_id = rec.get("run_id")
            if rec.get("follow"):
                run_id = read_state(rec["follow"]).get("run_id")
                if not run_id:
                    raise RunNotKnownYet(f"the run of spool {rec['follow']} is not created yet")
            run = client.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST for a wrong id
            if not rec.get("follow") and run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")  # a resumed run runs again
            self._log_batch(client, run_id, [{"tags": tags}])
            experiment_id = run.info.experiment_id
        else:
            experiment_id = ensure_experiment(rec["experiment"], self.uri())
            # A run made by an attempt whose answer was lost carries our spool id: adopt it.
            found = client.search_runs([experiment_id], f"tags.`{SPOOL_TAG}` = '{rec['spool_id']}'",
                                       max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                run_id = client.create_run(experiment_id, start_time=rec["t"], run_name=rec.get("run_name"),
                                           tags={**tags, SPOOL_TAG: rec["spool_id"]}).info.run_id
        return {"run_id": run_id, "experiment_id": experiment_id}

    def _ack(self, batch: list[tuple[dict, int]], fields: dict) -> None:
        last, offset = batch[-1]
        # A corrupt line has no seq: skipping it moves the offset, not the seq.
        self.spool.ack(last.get("seq", self.spool.acked), offset, **fields)
        for rec, _ in batch:
            if rec.get("file"):
                self.spool.remove_files(rec["seq"])
        if "run_id" in fields and self.on_run_id is not None:
            try:
                self.on_run_id(fields["run_id"])
            except Exception:
                log.exception("MLflow tracking: the on_run_id callback failed")
        with self._cond:
            self._cond.notify_all()

    def _failed(self, e: Exception, batch: list[tuple[dict, int]]) -> str:
        if not is_rejection(e):
            self.failures += 1
        if isinstance(e, RunNotKnownYet):
            if not self._waiting_logged:
                log.info("MLflow tracking: %s; spool %s waits for it", e, self.spool.path)
                self._waiting_logged = True
            return DOWN
        if not is_rejection(e):
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("MLflow unreachable (%s) at %s: %d records wait in spool %s; "
                            "training continues, retrying with backoff up to %gs",
                            short_error(e), self.uri(), self.pending, self.spool.path,
                            self.max_backoff_s)
            else:
                log.debug("MLflow still unreachable (%s)", short_error(e))
            return DOWN
        self._up()
        if len(batch) > 1:  # find the refused record: resend in halves
            self._split_until = max(self._split_until, batch[-1][0].get("seq", 0))
            self._split = len(batch) // 2
            return SHIPPED
        rec = batch[0][0]
        if rec["op"] == "run":
            self.blocked = f"MLflow refused to create or open the run ({short_error(e)})"
            log.warning("%s at %s: nothing more is shipped; spool %s keeps everything",
                        self.blocked, self.uri(), self.spool.path)
            return BLOCKED
        kind = KINDS.get(rec["op"], rec["op"])
        self.dropped[kind] = self.dropped.get(kind, 0) + items(rec)
        level = logging.DEBUG if kind in self._rejected_kinds else logging.WARNING
        self._rejected_kinds.add(kind)
        log.log(level, "MLflow rejected %s (%s): dropped; training continues",
                describe([rec]), short_error(e))
        self._ack(batch, {})
        return SHIPPED

    @property
    def pending(self) -> int:
        """Records appended but not shipped yet."""
        return self.spool.last_seq - self.spool.acked

    def _up(self) -> None:
        if self._down_since is not None:
            log.warning("MLflow reachable again after %.0fs; shipping %d spooled records",
                        time.monotonic() - self._down_since, self.pending)
            self._down_since = None
        self._waiting_logged = False

    # -- background thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mlflow-shipper-{self.spool.path.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = self.min_backoff_s
        while True:
            try:
                status = self.step()
            except Exception:  # a bug or a broken spool: stop shipping, keep the spool
                log.exception("MLflow tracking: shipping spool %s failed; it is kept", self.spool.path)
                self.blocked = "the shipper failed (see the traceback above)"
                self.first_attempt.set()
                status = BLOCKED
            with self._cond:
                self._cond.notify_all()  # wake drain() waiters on every outcome
                if status == SHIPPED:
                    backoff = self.min_backoff_s
                    if self._stop:
                        return
                elif status == IDLE:
                    self._cond.wait_for(lambda: self._stop or self._kicked
                                        or self.spool.last_seq > self.spool.acked)
                    if self._stop and self.spool.last_seq <= self.spool.acked:
                        return
                elif status == DOWN:
                    # New records do not cut the wait short (a dead server would be hit on
                    # every call); kick() and stop() do.
                    self._cond.wait_for(lambda: self._stop or self._kicked, backoff)
                    if self._stop:
                        return
                    backoff = min(backoff * 2, self.max_backoff_s)
                else:
                    return
                self._kicked = False

    def notify(self) -> None:
        """A record was appended."""
        with self._cond:
            self._cond.notify_all()

    def kick(self) -> None:
        """Try now, even while backing off."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float | None) -> bool:
        """Block until ``predicate()`` (checked after every attempt) or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_shipped(self, seq: int, timeout: float | None) -> bool:
        """Block until records up to ``seq`` are shipped (True), or until ``timeout`` passes,
        shipping is blocked or the thread has ended (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self.spool.acked >= seq or self.blocked is not None
                                or not self.alive, timeout)
            return self.spool.acked >= seq

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None) -> bool:
        """Stop after the request in flight; True if the thread has ended within ``timeout``."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive
