"""Batches of a ``ShardStream`` built ahead on a background thread, with an exact-resume position.

The thread reads, decodes and augments up to ``depth`` batches ahead of training. Each batch
travels with the stream's position just after it, so ``position`` is where the *consumer* stands
(the next sample training would take), never where the thread has read to: a checkpoint taken
between steps resumes at exactly the same sample with prefetching on or off. ``depth=0`` builds
each batch inline, through the same interface. ``wait_s`` adds up the time the consumer spent
waiting for data, the figure a training loop reports.

The stream itself is used only through ``batches(n)`` and ``position``; its internals are its own.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator, Optional

import torch

_END = object()


class BatchPrefetcher:
    """Iterator over ``(batch_size, ...)`` tensors from ``stream``; ``close()`` stops the thread."""

    def __init__(self, stream, batch_size: int, depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0 batches, got {depth}")
        self.stream, self.depth = stream, depth
        self._batches = stream.batches(batch_size)
        self.position = dict(stream.position)  # consumer's position: after the last batch taken
        self.wait_s = 0.0  # total time __next__ waited for a batch
        self.taken = 0
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if depth:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._fill, name="fdrl-prefetch", daemon=True)
            self._thread.start()

    def _produce(self) -> tuple[torch.Tensor, dict]:
        batch = next(self._batches)
        return batch, dict(self.stream.position)

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._produce()
                while not self._stop.is_set():  # put, but give up when asked to stop
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer, raised there
            self._put_final(err)

    def _put_final(self, err: BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put((_END, err), timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        start = time.perf_counter()
        if self._queue is None:
            batch, position = self._produce()
        else:
            batch, position = self._queue.get()
            if batch is _END:  # the thread's own error, as depth=0 would raise it: a
                # ShardReadError keeps its type and the shard's URI in the run's one-line error
                position.add_note("(raised while reading ahead on the prefetch thread)")
                raise position
        self.wait_s += time.perf_counter() - start
        self.position = position
        self.taken += 1
        return batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
