"""The one Ray fan-out: work items spread over a pool of actors, results handed back in item order.

Each actor runs ``setup(device, *shared)`` once and then ``work(state, item)`` per item; both are
plain functions of the layers below (a sampler chunk, a DGflow chunk, Inception features of a
shard, the moments of a group of shards), so nothing here knows what the work is. ``shared``
objects (a model, a prior, a classifier) are put in the object store once and reach every actor
as they are: this is how a model is shipped to actors.

An actor holds one GPU when the pool uses GPUs, else one CPU running one torch thread, which also
keeps CPU results bit-identical whatever the number of actors. Each actor keeps ``IN_FLIGHT``
items queued, so it never idles while its next item travels.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import ray
import torch

from fdrl.distributed.cluster import connect, has_gpus

IN_FLIGHT = 2


class _Actor:
    def __init__(self, use_gpu: bool, setup: Callable, *shared):
        if use_gpu:
            self.device = torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to this GPU
            # The flow's input gradients run conv backward kernels; pick deterministic ones.
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(1)
        self.state = setup(self.device, *shared)

    def run(self, work: Callable, item):
        return work(self.state, item)


class ActorPool:
    """``workers`` actors that each ran ``setup``; ``map`` runs work items on them. A context
    manager: the actors are killed on exit. ``gpu``: None uses GPUs when the cluster has some."""

    def __init__(self, workers: int, setup: Callable[..., Any], *shared,
                 gpu: Optional[bool] = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        connect()
        use_gpu = has_gpus() if gpu is None else gpu
        # No more actors than the cluster could ever hold at once: the items queued on an actor
        # that never starts would never run.
        workers = max(1, min(workers, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1))))
        actor = ray.remote(**({"num_gpus": 1} if use_gpu else {"num_cpus": 1}))(_Actor)
        refs = [ray.put(obj) for obj in shared]  # once, however many actors read them
        self.actors = [actor.remote(use_gpu, setup, *refs) for _ in range(workers)]

    def map(self, work: Callable[[Any, Any], Any], items: Sequence, *,
            sizes: Optional[Sequence[int]] = None, desc: str = "", progress: bool = False
            ) -> Iterator[tuple[int, Any]]:
        """(index, ``work(state, items[index])``) in item order, whichever actor ran it.
        ``sizes`` (per item) drive the progress bar."""
        from tqdm import tqdm

        queue = list(enumerate(items))
        pending: dict = {}  # object ref -> (actor, index)
        ready: dict[int, Any] = {}
        next_index = 0

        def submit(actor):
            index, item = queue.pop(0)
            pending[actor.run.remote(work, item)] = (actor, index)

        for _ in range(IN_FLIGHT):
            for actor in self.actors:
                if queue:
                    submit(actor)
        total = sum(sizes) if sizes is not None else len(items)
        with tqdm(total=total, desc=f"{desc} ({len(self.actors)} workers)", disable=not progress,
                  unit="img" if sizes is not None else "item") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                if not done:  # waited in slices, so signals (Ctrl-C, timeouts) get through
                    continue
                actor, index = pending.pop(done[0])
                try:
                    ready[index] = ray.get(done[0])
                except ray.exceptions.RayTaskError as err:  # the work's own error, as raised
                    if isinstance(err.cause, Exception):
                        raise err.cause from None
                    raise
                bar.update(sizes[index] if sizes is not None else 1)
                if queue:
                    submit(actor)  # the actor that just finished takes the next item
                while next_index in ready:
                    yield next_index, ready.pop(next_index)
                    next_index += 1

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fan_out(workers: int, setup: Callable, shared: Sequence, work: Callable, items: Sequence, *,
            sizes: Optional[Sequence[int]] = None, desc: str = "", progress: bool = False,
            gpu: Optional[bool] = None) -> list:
    """The results of ``work`` over ``items`` in item order, on a pool of at most ``workers``
    actors (no more than there are items) that is killed afterwards."""
    if not items:
        return []
    with ActorPool(min(workers, len(items)), setup, *shared, gpu=gpu) as pool:
        return [result for _, result in pool.map(work, items, sizes=sizes, desc=desc,
                                                 progress=progress)]
