"""The one sampler: FDRL Algorithm 2 and every other walk along a trained ratio's flow.

N samples are cut into chunks of a fixed size (``CHUNK``). Chunk i runs on its own generator,
seeded from (seed, i) alone; it draws its starting batch from the prior (unless the caller gives
the starting points) and then the flow noise. So a sample depends on (seed, its index, the chunk
size) and the model only: never on how many chunks a caller runs at once, nor on which worker
ran which chunk. Grids, ``jobs/sample.py``, evaluation stages, interpolation, refinement and
conditional or translation sampling all come through here.

Optional extras, per call: ``record`` keeps x at given step counts (e.g. 0, K, K + kappa: the
same trajectories at each stage); ``trace`` keeps the mean log r after every step (the KL
diagnostic); ``extra_potential`` adds a per-sample potential to f'(r) (class guidance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from fdrl.core.divergences import Pairing
from fdrl.core.flow import FlowSettings, Potential, flow
from fdrl.core.precision import network_output
from fdrl.core.priors import Prior

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


def chunks(n: int, chunk: int = CHUNK) -> list[tuple[int, int, int]]:
    """(index, start, size) of each chunk; the last one may be short."""
    if n < 1 or chunk < 1:
        raise ValueError(f"need n >= 1 and chunk >= 1, got n={n}, chunk={chunk}")
    return [(i, start, min(chunk, n - start)) for i, start in enumerate(range(0, n, chunk))]


@dataclass
class Samples:
    x: torch.Tensor  # the final samples, on the CPU
    stages: dict[int, torch.Tensor] = field(default_factory=dict)  # step count -> x at that step
    log_r: Optional[torch.Tensor] = None  # mean log r at steps 0..steps (with ``trace``)


def sample_chunk(net: nn.Module, pairing: Pairing, flow_settings: FlowSettings, seed: int,
                 index: int, size: int, *, prior: Optional[Prior] = None,
                 start: Optional[torch.Tensor] = None, steps: Optional[int] = None,
                 record: Sequence[int] = (), trace: bool = False,
                 extra_potential: Optional[Potential] = None, device="cpu") -> Samples:
    """Chunk ``index`` of a run: ``size`` samples from ``prior`` (or from ``start``, the chunk's
    own starting points), flowed ``steps`` steps (default K + kappa)."""
    steps = flow_settings.sampling_steps if steps is None else steps
    marks = sorted({int(s) for s in record} | {steps})
    if marks[0] < 0 or marks[-1] > steps:
        raise ValueError(f"record steps must lie in [0, {steps}], got {list(record)}")
    gen = torch.Generator(device=device).manual_seed(chunk_seed(seed, index))
    if start is None:
        if prior is None:
            raise ValueError("sampling needs a prior or starting points")
        x = prior.sample(size, gen, device=device)
    else:
        if len(start) != size:
            raise ValueError(f"chunk {index}: {len(start)} starting points for {size} samples")
        x = start.to(device=device, dtype=torch.float32)
    stages, traces, done = {}, [], 0
    for mark in marks:
        if mark > done:
            x, segment = flow(net, x, pairing, mark - done, flow_settings.eta, flow_settings.nu,
                              gen, extra_potential, return_log_r=True,
                              precision=flow_settings.precision)
            traces.append(segment if not traces else segment[1:])
            done = mark
        if mark in record:
            stages[mark] = x.cpu()
    log_r = None
    if trace:
        log_r = torch.cat(traces) if traces else _log_r_now(net, pairing, x, flow_settings.precision)
    return Samples(x.cpu(), stages, log_r)


@torch.no_grad()
def _log_r_now(net, pairing, x, precision="fp32"):
    return pairing.log_r(network_output(net, x, precision)).mean().reshape(1).cpu()


def sample(net: nn.Module, pairing: Pairing, flow_settings: FlowSettings, n: Optional[int] = None,
           seed: int = 0, *, prior: Optional[Prior] = None, start: Optional[torch.Tensor] = None,
           steps: Optional[int] = None, record: Sequence[int] = (), trace: bool = False,
           extra_potential: Optional[Potential] = None, chunk: int = CHUNK, device="cpu",
           progress=None) -> Samples:
    """N samples in this process, chunk by chunk: the same array a distributed run gives.

    ``start`` (N x ...) replaces prior draws: refinement, interpolation and translation flow
    given points. ``trace`` averages each chunk's log r curve weighted by its size.
    ``progress``: an optional callable taking the number of samples just finished.
    """
    if start is not None:
        n = len(start) if n is None else n
        if n != len(start):
            raise ValueError(f"n={n} but {len(start)} starting points were given")
    if n is None:
        raise ValueError("give n or starting points")
    out, curve = [], None
    stages: dict[int, list] = {}
    for index, begin, size in chunks(n, chunk):
        part = sample_chunk(net, pairing, flow_settings, seed, index, size, prior=prior,
                            start=None if start is None else start[begin:begin + size],
                            steps=steps, record=record, trace=trace,
                            extra_potential=extra_potential, device=device)
        out.append(part.x)
        for mark, x in part.stages.items():
            stages.setdefault(mark, []).append(x)
        if trace:
            curve = part.log_r * size if curve is None else curve + part.log_r * size
        if progress is not None:
            progress(size)
    return Samples(torch.cat(out), {k: torch.cat(v) for k, v in stages.items()},
                   None if curve is None else curve / n)
