"""DGflow-style refinement with an FDRL ratio network: push given samples along
x <- x - eta grad f'(r(x)) + sqrt(2 eta gamma) xi, the (stale) ratio standing in for DGflow's
discriminator.

This is FDRL's flow with noise nu = sqrt(2 eta gamma), run by the one sampler from the given
points; gamma = 0 is DGflow's deterministic variant. The log r trace along the way is the KL
diagnostic: it should fall as samples improve.
"""

from __future__ import annotations

import math

import torch

from fdrl.core.flow import FlowSettings
from fdrl.core.networks import check_input
from fdrl.core.sampler import sample


def refine(net, pairing, samples: torch.Tensor, steps: int, eta: float, gamma: float,
           seed: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Refined samples and the batch mean of log r after each step (steps + 1 values)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    check_input(samples, net.in_shape)
    settings = FlowSettings(flow_steps=steps, extra_steps=0, eta=eta, nu=math.sqrt(2 * eta * gamma))
    refined = sample(net, pairing, settings, seed=seed, start=samples, trace=True, device=device)
    return refined.x, refined.log_r
