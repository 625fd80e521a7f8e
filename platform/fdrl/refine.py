"""DGflow-style refinement: push given samples along x <- x - eta grad f'(r(x)) + sqrt(2 eta gamma) xi
with a trained FDRL ratio network as the (stale) density-ratio estimator.

This is FDRL's flow with noise nu = sqrt(2 eta gamma); gamma = 0 is DGflow's deterministic
variant. The log r trace along the way is the KL diagnostic: it should fall as samples improve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .flow import flow
from .networks import check_input


def refine(net, pairing, samples: torch.Tensor, steps: int, eta: float, gamma: float,
           seed: int = 0, batch: int = 256, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Refined samples and the per-step batch mean of log r (steps + 1 values, averaged over batches)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    check_input(samples, net.in_shape)
    nu = math.sqrt(2 * eta * gamma)
    gen = torch.Generator(device=device).manual_seed(seed)
    outs, traces = [], []
    for chunk in samples.split(batch):
        x, trace = flow(net, chunk.to(device), pairing, steps, eta, nu, gen, return_log_r=True)
        outs.append(x.cpu())
        traces.append(trace * len(chunk))
    return torch.cat(outs), torch.stack(traces).sum(0) / len(samples)


def load_input(spec: str, n: Optional[int], seed: int, tracking_uri: Optional[str]) -> np.ndarray:
    """Samples to refine: a .npy file (N x C x H x W in [-1, 1]) or models:/NAME@ALIAS of another
    registered FDRL generator, sampled here with its own flow."""
    if spec.startswith("models:/"):
        from .registry import load_fdrl_model
        from .sampling import FlowSettings, sample_local

        source = load_fdrl_model(spec, tracking_uri)
        settings = FlowSettings.from_config(source.config)
        return sample_local(source.net, source.prior, source.config.pairing, settings, n or 256, seed)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"input samples not found: {path} (a .npy file or models:/NAME@ALIAS)")
    array = np.load(path, allow_pickle=False)
    return array[:n] if n else array
