"""The one sampler: FDRL Algorithm 2 and every other walk along a trained ratio's flow.

N samples are cut into chunks (``fdrl.core.chunks``). Chunk i runs on its own generator, seeded
from (seed, i) alone; it draws its starting batch from the prior (unless the caller gives the
starting points) and then the flow noise. Grids, ``jobs/sample.py``, evaluation stages,
interpolation, refinement with a ratio model and conditional or translation sampling all come
through here.

Optional extras, per call: ``record`` keeps x at given step counts (e.g. 0, K, K + kappa: the
same trajectories at each stage); ``trace`` keeps the mean log r after every step (the KL
diagnostic); ``extra_potential`` adds a per-sample potential to f'(r) (class guidance).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from fdrl.core.chunks import CHUNK, Chunk, Samples, chunk_seed, run_chunks
from fdrl.core.divergences import Pairing
from fdrl.core.flow import FlowSettings, Potential, flow
from fdrl.core.guidance import class_potential, frozen
from fdrl.core.precision import network_output
from fdrl.core.priors import Prior


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
                              precision=flow_settings.precision, bound=flow_settings.bound)
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

    def one(c: Chunk) -> Samples:
        return sample_chunk(net, pairing, flow_settings, seed, c.index, c.size, prior=prior,
                            start=None if start is None else start[c.start:c.start + c.size],
                            steps=steps, record=record, trace=trace,
                            extra_potential=extra_potential, device=device)

    return run_chunks(one, n, chunk, progress)


def refinement_flow(steps: int, eta: float, gamma: float, precision: str = "fp32") -> FlowSettings:
    """DGflow's update x <- x - eta grad f'(r(x)) + sqrt(2 eta gamma) xi as a flow of ``steps``
    steps: FDRL's flow with nu = sqrt(2 eta gamma); gamma = 0 is the deterministic variant."""
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return FlowSettings(flow_steps=steps, extra_steps=0, eta=eta, nu=math.sqrt(2 * eta * gamma),
                        precision=precision)


class ChunkSampler:
    """A trained model on one device, drawing whole chunks: what each Ray actor of a sampling
    run holds (``fdrl.distributed.fanout``). With a classifier, a chunk can be guided towards a
    label (``fdrl.core.guidance``); with starting points, it flows those instead of prior draws."""

    def __init__(self, device, net: nn.Module, prior: Optional[Prior], pairing: Pairing,
                 flow_settings: FlowSettings, classifier: Optional[nn.Module] = None,
                 phi: float = 0.0):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.prior = None if prior is None else prior.to(self.device)
        self.pairing, self.flow = pairing, flow_settings
        self.classifier = None if classifier is None else frozen(classifier.to(self.device))
        self.phi = phi

    def draw(self, seed: int, index: int, size: int, label: Optional[int] = None,
             start: Optional[torch.Tensor] = None, steps: Optional[int] = None) -> torch.Tensor:
        """Chunk ``index`` of a run seeded with ``seed``, on the CPU."""
        potential = None if label is None else class_potential(self.classifier, label, self.phi, self.pairing)
        return sample_chunk(self.net, self.pairing, self.flow, seed, index, size, prior=self.prior,
                            start=start, steps=steps, extra_potential=potential,
                            device=self.device).x


def draw_chunk(sampler: ChunkSampler, item: tuple) -> torch.Tensor:
    """The fan-out's work: ``item`` is ``ChunkSampler.draw``'s arguments."""
    return sampler.draw(*item)
