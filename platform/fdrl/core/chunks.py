"""The one chunk loop: N samples cut into chunks of a fixed size, each chunk on its own seed.

Chunk i of a run seeded with s draws everything (prior batch, latents, flow noise) from a
generator seeded with ``chunk_seed(s, i)``. A sample therefore depends on (seed, its index, the
chunk size) and the model only: never on how many chunks run at once, nor on which process ran
which chunk. The sampler, DGflow refinement and every Ray fan-out over chunks cut their work with
``chunks`` and put the results back together with ``merge``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

CHUNK = 64  # part of the seeding: a different chunk size gives different samples


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of chunk ``index`` of a run seeded with ``seed``.

    Chunk 0 uses ``seed`` itself, so a run of at most one chunk (a 64-sample grid) draws exactly
    what one generator seeded with ``seed`` draws; later chunks get well-mixed 63-bit seeds.
    """
    if index == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class Chunk(NamedTuple):
    index: int  # its seed is chunk_seed(seed, index)
    start: int  # its first sample's position in the run
    size: int


def chunks(n: int, chunk: int = CHUNK) -> list[Chunk]:
    """The chunks of an n-sample run; the last one may be short."""
    if n < 1 or chunk < 1:
        raise ValueError(f"need n >= 1 and chunk >= 1, got n={n}, chunk={chunk}")
    return [Chunk(i, start, min(chunk, n - start)) for i, start in enumerate(range(0, n, chunk))]


@dataclass
class Samples:
    x: torch.Tensor  # the final samples, on the CPU
    stages: dict[int, torch.Tensor] = field(default_factory=dict)  # step count -> x at that step
    log_r: Optional[torch.Tensor] = None  # mean log r at steps 0..steps, when traced


def merge(parts: Sequence[tuple[int, Samples]]) -> Samples:
    """(size, samples) of consecutive chunks -> one run: arrays concatenated in order, the log r
    curve averaged with each chunk weighted by its size."""
    if not parts:
        raise ValueError("no chunks to merge")
    curve, total = None, 0
    stages: dict[int, list] = {}
    for size, part in parts:
        for mark, x in part.stages.items():
            stages.setdefault(mark, []).append(x)
        if part.log_r is not None:
            curve = part.log_r * size if curve is None else curve + part.log_r * size
        total += size
    return Samples(torch.cat([part.x for _, part in parts]),
                   {mark: torch.cat(xs) for mark, xs in stages.items()},
                   None if curve is None else curve / total)


def run_chunks(fn: Callable[[Chunk], Samples], n: int, chunk: int = CHUNK,
               progress: Optional[Callable[[int], None]] = None) -> Samples:
    """``fn`` over the chunks of an n-sample run in this process, merged. ``progress`` is called
    with the size of each finished chunk."""
    parts = []
    for c in chunks(n, chunk):
        parts.append((c.size, fn(c)))
        if progress is not None:
            progress(c.size)
    return merge(parts)
