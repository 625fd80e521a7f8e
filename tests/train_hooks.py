"""Test-only wrappers around the production training loop (``train_loop_per_worker``): they
patch the worker's one reporting function inside the worker process, so the production loop and
``TrainConfig`` carry no test hooks. Loaded by conftest's ``hooks`` fixture and pickled by value."""

import json
import os
import signal
import time
from pathlib import Path

MARKER_TIMEOUT_S = 300


def _wrap_report(after=None, before=None, start=None):
    """The production loop, with ``before``/``after(cfg, state, rank)`` run around each report
    and ``start(config, rank)`` before the loop."""

    def loop(config: dict) -> None:
        import ray.train

        import fdrl.distributed.train_worker as worker

        rank = ray.train.get_context().get_world_rank()
        original = worker.report

        def report(cfg, state, *args, **kwargs):
            if before is not None:
                before(cfg, state, rank)
            original(cfg, state, *args, **kwargs)
            if after is not None:
                after(cfg, state, rank)

        if start is not None:
            start(config, rank)
        worker.report = report
        try:
            worker.train_loop_per_worker(config)
        finally:
            worker.report = original

    return loop


def killed_after(step: int, marker: str):
    """Rank 0's process SIGKILLs itself right after reporting ``step``, on the first attempt only
    (``marker`` records that it happened): a real death, not an exception."""

    def after(cfg, state, rank):
        if rank == 0 and state.step == step and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return _wrap_report(after=after)


def raises_after(step: int, error: BaseException):
    """Rank 0 raises ``error`` after reporting ``step``, on every attempt."""

    def after(cfg, state, rank):
        if rank == 0 and state.step == step:
            raise error

    return _wrap_report(after=after)


def overlap_markers(folder: str, wait_for: int):
    """Rank 0 writes ``<folder>/<run>.started`` before its first step and waits until ``wait_for``
    runs have started; before its final report it writes ``<run>.finished`` listing the runs that
    had started by then, so a test can tell runs overlapped without timing them."""
    marks = Path(folder)

    def start(config, rank):
        if rank:
            return
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"{config['run_name']}.started").write_text("")
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        while len(list(marks.glob("*.started"))) < wait_for:  # a condition, not a delay
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(marks.glob('*.started')))} of {wait_for} "
                                   f"runs started within {MARKER_TIMEOUT_S} s")
            time.sleep(0.05)

    def before(cfg, state, rank):
        if rank == 0 and state.step == cfg.steps:  # before: Tune may end the trial once it sees it
            seen = sorted(p.stem for p in marks.glob("*.started"))
            (marks / f"{cfg.run_name}.finished").write_text(json.dumps(seen))

    return _wrap_report(before=before, start=start)


def pauses_at(steps, folder: str, timeout_s: float = 600):
    """After reporting each step in ``steps``, rank 0 writes ``<folder>/reached-<step>`` and waits
    until the test writes ``<folder>/go-<step>``: the test acts (kills a server, removes a node)
    at a known point of the run. Every rank waits, so the run stands still meanwhile; on a
    restart the pauses already passed are skipped."""

    def after(cfg, state, rank):
        if state.step not in steps:
            return
        marks = Path(folder)
        marks.mkdir(parents=True, exist_ok=True)
        go = marks / f"go-{state.step}"
        if go.exists():  # passed before a restart
            return
        import ray

        (marks / f"reached-{state.step}-rank{rank}").write_text(ray.get_runtime_context().get_node_id())
        deadline = time.monotonic() + timeout_s
        while not go.exists():  # a condition the test sets, not a delay
            if time.monotonic() > deadline:
                raise TimeoutError(f"nobody wrote {go} within {timeout_s} s")
            time.sleep(0.05)

    return _wrap_report(after=after)


def gan_raises_at(step: int, error: BaseException):
    """The baseline generators' loop (``gan_loop_per_worker``), where rank 0 raises ``error`` as
    it reaches the checkpoint report of ``step``: the steps since the last checkpoint are lost."""

    def loop(config: dict) -> None:
        import ray.train

        import fdrl.distributed.gan_worker as worker

        rank = ray.train.get_context().get_world_rank()
        original = worker.report

        def report(nets, opts, gen, at, *args, **kwargs):
            if rank == 0 and at == step:
                raise error
            original(nets, opts, gen, at, *args, **kwargs)

        worker.report = report
        try:
            worker.gan_loop_per_worker(config)
        finally:
            worker.report = original

    return loop
