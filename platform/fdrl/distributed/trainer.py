"""Ray Train on the driver: a run's TorchTrainer, its reports, and its failure policy.

``fit`` starts the workers, hands every report of rank 0 to ``on_report(metrics, checkpoint)`` in
this process (a Ray Train callback on the controller forwards each one through a queue), and
decides what a failure means:
* errors that will repeat (a non-finite loss, unreadable or tampered data, a shape or worker-count
  mismatch, a bad config, a full disk) end the run on the first attempt;
* infrastructure failures (a worker process killed, a node lost, an OOM kill, a worker group that
  could not start) restart the workers from the newest checkpoint, up to ``max_failures`` times.
Ray Train would retry every error alike, so each attempt runs with ``max_failures=0`` and the
restart happens here: a new TorchTrainer over the same run folder resumes from its checkpoint.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import ray
from ray.train.v2.api.callback import UserCallback

INFRASTRUCTURE_NAMES = {  # Ray's exception classes for a lost process or node, matched by name
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
    "NodeDiedError", "OutOfMemoryError", "WorkerHealthCheckFailedError",
    "WorkerHealthCheckTimeoutError", "WorkerGroupStartupFailedError",
    "WorkerGroupStartupTimeoutError", "PreemptionError", "ObjectLostError",
}
LOST_PEER_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                   "NCCL communicator was aborted")


@dataclass
class TrainerSpec:
    train_loop: Callable[[dict], None]  # the per-worker function
    config: dict  # its only argument, the same on every worker
    name: str  # the run folder under ``storage``
    storage: str  # a local folder or an object-store URI
    workers: int
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    keep_checkpoints: int = 3
    max_failures: int = 2  # restarts after infrastructure failures
    callbacks: list = field(default_factory=list)  # more Ray Train callbacks (Tune's)


class RunFailed(RuntimeError):
    """A run that will not be retried: ``cause`` is the worker's own exception."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause

    def __reduce__(self):  # Tune hands a trial's error to the driver by pickling it
        return type(self), (str(self), self.cause)


def fit(spec: TrainerSpec, on_report: Callable[[dict, Optional[str]], None],
        on_retry: Callable[[int, str], None] = lambda attempt, why: None) -> Any:
    """Train to the end and return Ray's ``Result``; raises ``RunFailed`` when a failure is not
    worth retrying or the restarts are used up."""
    for attempt in range(spec.max_failures + 1):
        try:
            return _fit_once(spec, on_report)
        except ray.train.TrainingFailedError as err:
            retry, cause, message = classify(err)
            if not retry:
                raise RunFailed(message, cause) from None
            if attempt == spec.max_failures:
                raise RunFailed(f"{message} (after {attempt} restarts; --max-failures "
                                f"{spec.max_failures})", cause) from None
            on_retry(attempt + 1, message)
    raise AssertionError("unreachable")


def _fit_once(spec: TrainerSpec, on_report) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from fdrl.data import storage

    fs, path = storage.filesystem(spec.storage) if storage.is_uri(spec.storage) else (None, spec.storage)
    # On this node, as Ray Train's own controller: a lost worker node must not take the queue along.
    here = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}
    reports = Queue(actor_options={"num_cpus": 0, "label_selector": here})
    trainer = TorchTrainer(
        spec.train_loop, train_loop_config=spec.config,
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=spec.workers, use_gpu=spec.use_gpu,
            resources_per_worker=None if spec.use_gpu else {"CPU": spec.cpus_per_worker}),
        run_config=RunConfig(
            name=spec.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            failure_config=FailureConfig(max_failures=0),
            callbacks=[_ForwardReports(reports), *spec.callbacks]))
    drain = threading.Thread(target=_drain, args=(reports, on_report), name="fdrl-reports", daemon=True)
    drain.start()
    try:
        return trainer.fit()
    finally:
        reports.put(None)  # after every report of this attempt: the drain ends in order
        drain.join()
        ray.kill(reports.actor)


class _ForwardReports(UserCallback):
    """On the controller: each report of rank 0, with its persisted checkpoint's path."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))


def _drain(queue, on_report) -> None:
    import logging

    while (item := queue.get()) is not None:
        try:
            on_report(*item)
        except Exception:  # noqa: BLE001 - a reporting error must not stop the training
            logging.getLogger("fdrl.trainer").exception("handling a report failed")


def gather(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order, on every rank (inside a training loop)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def restore_newest_valid(run_dir: str, load: Callable[[str], Any], warn: Callable[[str], None]) -> Any:
    """``load(folder)`` of the checkpoint Ray Train resumes from (inside a training loop); when it
    raises ``CorruptCheckpointError``, that of the newest other ``checkpoint_*`` folder of
    ``run_dir`` that loads. None when the run starts fresh."""
    from fdrl.data import storage
    from fdrl.data.checkpoint import CorruptCheckpointError

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    try:
        with checkpoint.as_directory() as d:
            return load(d)
    except CorruptCheckpointError as err:
        warn(f"warning: {err}; trying the previous checkpoint")
    for candidate in reversed(storage.glob(run_dir, "checkpoint_[0-9]*")):  # names sort by time
        if storage.name(candidate) == storage.name(checkpoint.path):
            continue
        fs, inner = storage.filesystem(candidate) if storage.is_uri(candidate) else (None, candidate)
        try:
            with ray.train.Checkpoint(inner, filesystem=fs).as_directory() as d:
                loaded = load(d)
        except CorruptCheckpointError as err:
            warn(f"warning: skipping a bad checkpoint: {err}")
            continue
        warn(f"restored {candidate} instead")
        return loaded
    raise CorruptCheckpointError(f"no valid checkpoint left in {run_dir}")


def classify(err: BaseException) -> tuple[bool, BaseException, str]:
    """(retry?, the cause, one line naming it) for a failed ``trainer.fit()``. A lost process or
    node among the workers' errors makes the run retryable. When a rank dies, the others fail with
    collateral errors (a closed connection in the all-reduce), often before Ray notices the death:
    those alone also mean a lost peer, but a worker's own error beside them is the cause."""
    failures = list(getattr(err, "worker_failures", {}).items())
    controller = getattr(err, "controller_failure", None)
    if controller is not None:
        failures.append((None, controller))
    causes = [(rank, _unwrap(e)) for rank, e in failures] or [(None, err)]
    lost = [(rank, e) for rank, e in causes if _is_infrastructure(e)]
    if lost:
        rank, cause = lost[0]
        return True, cause, f"{_where(rank)} lost: {type(cause).__name__}: {_first_line(cause)}"
    own = [(rank, e) for rank, e in causes if not _is_lost_peer(e)]
    if not own:
        rank, cause = causes[0]
        return True, cause, f"a peer of {_where(rank)} lost: {_first_line(cause)}"
    rank, cause = own[0]
    return False, cause, f"{_where(rank)}: {describe(cause)}"


def describe(cause: BaseException) -> str:
    """One line for the user: a full disk says so; anything else is 'Type: message'."""
    full = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    if full or "No space left on device" in str(cause):  # pyarrow's copies set no errno
        where = getattr(cause, "filename", None) or _first_line(cause)
        return (f"the storage is full ({where}): free space, then continue with --resume from "
                "the last complete checkpoint")
    return f"{type(cause).__name__}: {_first_line(cause)}"


def _unwrap(error: BaseException) -> BaseException:
    # Ray wraps a worker's own exception (with its traceback as text); a dead worker's health
    # check failure carries the actor error.
    inner = getattr(error, "_base_exc", None)
    return inner if isinstance(inner, BaseException) else error


def _is_infrastructure(error: BaseException) -> bool:
    return any(cls.__name__ in INFRASTRUCTURE_NAMES for cls in type(error).__mro__)


def _is_lost_peer(error: BaseException) -> bool:
    # torch.distributed's own class for a backend failure, or gloo's and NCCL's words for a peer
    # that went away mid-collective.
    if any(cls.__name__ == "DistBackendError" for cls in type(error).__mro__):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error) for words in LOST_PEER_WORDS)


def _where(rank) -> str:
    return "training" if rank is None else f"worker {rank}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:400] if text else type(error).__name__
