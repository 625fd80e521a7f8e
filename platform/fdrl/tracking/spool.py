"""The local journal a :class:`~fdrl.tracking.tracker.Tracker` writes before anything reaches MLflow.

A spool is a folder::

    journal.jsonl   one JSON record per line, append-only; each append is fsynced
    state.json      what has been shipped: {"acked": seq, "offset": byte offset after that
                    record, "run_id", "experiment_id"}; replaced atomically (write, fsync, rename)
    files/<seq>/    the copy of a logged artifact, made at call time; deleted once shipped
    lock            flock'ed by the one process that owns the spool (a tracker or a replay)

Every record has ``seq`` (1, 2, ... without gaps), ``op`` and ``t`` (the call's wall time, ms).
The first record is always ``op: "run"`` (which run to create or open). A process killed while
appending leaves at most one torn last line; :meth:`Spool.open` cuts it off, so the next
append starts on a clean line and a reader never sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from fdrl.data.storage import fsync_dir

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (one owner per spool is then up to the caller)
    fcntl = None

JOURNAL = "journal.jsonl"
STATE = "state.json"
FILES = "files"
LOCK = "lock"


class SpoolError(RuntimeError):
    """A spool folder that cannot be used: locked by another process, or not a spool."""


def now_ms() -> int:
    return int(time.time() * 1000)


def read_state(spool_dir: str | Path) -> dict:
    """state.json of a spool ({} before anything was shipped); no lock needed (atomic replace)."""
    try:
        return json.loads((Path(spool_dir) / STATE).read_text())
    except FileNotFoundError:
        return {}


class Spool:
    """One open spool folder. ``append`` is called by one thread (the owner's), ``read`` and
    ``ack`` by one other (the shipper); they share no mutable state except ``last_seq``, which
    only ``append`` writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise SpoolError(f"spool {self.path} is in use by another process "
                                 "(a live tracker or replay holds its lock)") from None
        self.state = read_state(self.path)
        self._journal = self.path / JOURNAL
        new = not self._journal.exists()
        self._fd = os.open(self._journal, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if new:
            fsync_dir(self.path)  # the journal's directory entry survives a crash too
        self.last_seq = self._recover()

    def _recover(self) -> int:
        """Seq of the last complete record. Cuts off what follows it: a torn tail (a line
        without its newline, or garbage) left by a process killed mid-append, so that the next
        append starts on a clean line. A damaged line followed by good ones is kept (the
        shipper skips it with a warning) rather than cutting off the good ones."""
        acked, offset = self.state.get("acked", 0), self.state.get("offset", 0)
        size = os.fstat(self._fd).st_size
        if offset > size:
            raise SpoolError(f"{self._journal} is shorter ({size} B) than its shipped part "
                             f"({offset} B, {STATE}): not the journal this state belongs to")
        last, good_end = acked, offset
        for record, end in self.read(offset):
            if "seq" in record:
                last, good_end = record["seq"], end
        if good_end < size:
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)
        return last

    @property
    def acked(self) -> int:
        return self.state.get("acked", 0)

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")

    def append(self, op: str, files_from: Path | None = None, **fields) -> int:
        """Write one record (and, with ``files_from``, first copy that file or folder to
        files/<seq>/); returns its seq. Raises OSError / ValueError with nothing appended."""
        seq = self.last_seq + 1
        record = {"seq": seq, "op": op, "t": fields.pop("t", None) or now_ms(), **fields}
        if files_from is not None:
            dest = self.path / FILES / str(seq) / (files_from.resolve().name or "root")
            shutil.rmtree(dest.parent, ignore_errors=True)  # a copy left by a failed append
            dest.parent.mkdir(parents=True)
            if files_from.is_dir():
                shutil.copytree(files_from, dest)
            else:
                shutil.copy2(files_from, dest)
            record["file"] = str(dest.relative_to(self.path))
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        size = os.fstat(self._fd).st_size
        try:
            os.write(self._fd, line)
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, size)  # e.g. disk full mid-line: leave no torn line behind
            raise
        self.last_seq = seq
        return seq

    def read(self, offset: int, limit: int | None = None) -> list[tuple[dict, int]]:
        """Up to ``limit`` complete records from byte ``offset``: [(record, offset after it)].
        Safe to call from any thread (its own file handle)."""
        out = []
        with open(self._journal, "rb") as reader:
            reader.seek(offset)
            while limit is None or len(out) < limit:
                line = reader.readline()
                if not line.endswith(b"\n"):  # end of file, or a line still being written
                    break
                offset += len(line)
                try:
                    record = json.loads(line)
                except ValueError:  # a torn tail, or a damaged disk (appends are whole lines)
                    record = None
                if not isinstance(record, dict) or "seq" not in record:
                    record = {"op": "corrupt", "line": line[:120].decode(errors="replace")}
                out.append((record, offset))
        return out

    def pending(self) -> list[dict]:
        """The records not shipped yet."""
        return [r for r, _ in self.read(self.state.get("offset", 0))]

    def ack(self, seq: int, offset: int, **fields) -> None:
        """Record durably that everything up to ``seq`` (ending at byte ``offset``) is shipped."""
        state = {**self.state, **fields, "acked": seq, "offset": offset}
        tmp = self.path / f".{STATE}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / STATE)
        fsync_dir(self.path)
        self.state = state

    def remove_files(self, seq: int) -> None:
        shutil.rmtree(self.path / FILES / str(seq), ignore_errors=True)

    def close(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        os.close(self._lock_fd)  # releases the flock
        self._fd = None
