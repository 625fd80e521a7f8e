"""One FDRL training step (Algorithm 1) and the state it updates. Pure torch: the 2D toy job and
the distributed Ray worker both call ``train_step``.

step: x0 ~ prior -> flow K steps with the current weights (eval mode, no graph) -> Bregman loss on
(data + dequantisation noise, flowed samples) -> Adam -> EMA.

``flow.precision`` applies to the network in the flow and in the loss's forward; the loss, the
gradients of fp32 parameters, Adam's state and the EMA stay in fp32.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from fdrl.core.divergences import Pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.flow import flow as run_flow
from fdrl.core.precision import network_output
from fdrl.core.priors import Prior


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the message names the step and the values."""


@dataclass
class TrainState:
    """Everything a step mutates. ``model`` may be a DDP wrapper around ``module``."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0

    @property
    def module(self) -> nn.Module:
        return getattr(self.model, "module", self.model)


def lr_multiplier(decay_steps: Sequence[int], factor: float = 0.1):
    """Learning-rate multiplier: times ``factor`` at each step in ``decay_steps`` (paper: 80k, 90k)."""
    milestones = sorted(decay_steps)
    return lambda step: factor ** sum(step >= m for m in milestones)


def make_state(model: nn.Module, lr: float, betas=(0.9, 0.999),
               decay_steps: Sequence[int] = (), module: Optional[nn.Module] = None) -> TrainState:
    """``model`` is what the optimizer steps (maybe DDP); ``module`` the plain network for the EMA."""
    module = module if module is not None else getattr(model, "module", model)
    ema = copy.deepcopy(module).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(decay_steps))
    return TrainState(model, ema, optimizer, scheduler)


@torch.no_grad()
def ema_update(ema: nn.Module, module: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), module.parameters()):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), module.buffers()):
        be.copy_(b)


def dequantize(x: torch.Tensor, std: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    if std == 0:
        return x
    return x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def train_step(state: TrainState, data: torch.Tensor, prior: Prior, pairing: Pairing,
               flow: FlowSettings, generator: Optional[torch.Generator] = None,
               dequant_std: float = 0.03, ema_decay: float = 0.998) -> dict[str, float]:
    """One step; returns loss, mean log r on data and on flowed samples, grad norm and lr."""
    batch = data.shape[0]
    x0 = prior.sample(batch, generator, device=data.device)
    # Each worker flows its own batch through the plain module: no DDP hooks, no all-reduce.
    x_flowed = run_flow(state.module, x0, pairing, flow.flow_steps, flow.eta, flow.nu, generator,
                        precision=flow.precision, bound=flow.bound)
    x_data = dequantize(data, dequant_std, generator)

    state.model.train()
    # One forward, so DDP all-reduces once.
    out = network_output(state.model, torch.cat([x_data, x_flowed]), flow.precision)
    out_data, out_flowed = out[:batch], out[batch:]
    loss = pairing.loss(out_data, out_flowed)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite loss at step {state.step}: loss={loss.item()}, "
            f"mean output on data={out_data.mean().item()}, "
            f"on flowed samples={out_flowed.mean().item()}, pairing={pairing.name}"
        )
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), math.inf)
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    ema_update(state.ema, state.module, ema_decay)
    state.step += 1
    with torch.no_grad():
        return {
            "loss": loss.item(),
            "log_r_data": pairing.log_r(out_data).mean().item(),
            "log_r_flowed": pairing.log_r(out_flowed).mean().item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
        }
