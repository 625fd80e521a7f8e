"""The Euler-Maruyama flow x <- x - eta * grad_x f'(r(x)) + nu * xi  (FDRL eq. 9).

The same function pushes prior samples K steps during training and K + kappa steps when sampling.
Only input gradients are taken: parameters never accumulate ``.grad``, and no graph survives a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from fdrl.core.divergences import Pairing

# An extra per-sample potential added to f'(r(x)), e.g. -phi * log p(y|x) for class-conditional
# generation. It maps a batch x to a tensor of shape (batch,).
Potential = Callable[[torch.Tensor], torch.Tensor]


def check_flow_args(steps: int, eta: float, nu: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"flow steps K must be an integer >= 1, got {steps!r}")
    if not eta > 0:
        raise ValueError(f"flow step size eta must be > 0, got {eta!r}")
    if not nu >= 0:
        raise ValueError(f"flow noise nu must be >= 0, got {nu!r}")


@dataclass(frozen=True)
class FlowSettings:
    """The flow of a model: K steps in training, K + kappa when sampling, step eta, noise nu."""

    flow_steps: int  # K
    extra_steps: int  # kappa
    eta: float
    nu: float

    def __post_init__(self):
        check_flow_args(self.flow_steps, self.eta, self.nu)
        if not isinstance(self.extra_steps, int) or self.extra_steps < 0:
            raise ValueError(f"extra flow steps kappa must be an integer >= 0, got {self.extra_steps!r}")

    @property
    def sampling_steps(self) -> int:
        return self.flow_steps + self.extra_steps

    @classmethod
    def from_config(cls, config, **overrides) -> "FlowSettings":
        """From any object with flow_steps, extra_steps, eta and nu; None overrides are ignored."""
        base = dict(flow_steps=config.flow_steps, extra_steps=config.extra_steps,
                    eta=config.eta, nu=config.nu)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def flow(
    net: nn.Module,
    x: torch.Tensor,
    pairing: Pairing,
    steps: int,
    eta: float,
    nu: float,
    generator: Optional[torch.Generator] = None,
    extra_potential: Optional[Potential] = None,
    return_log_r: bool = False,
):
    """Run ``steps`` flow steps from ``x``; returns the flowed batch (detached).

    With ``return_log_r`` it returns ``(x, log_r)`` where ``log_r[k]`` is the batch mean of
    log r(x_k) for k = 0..steps: the KL diagnostic of the DGGF paper along the flow.
    ``net`` runs in eval mode for the duration and its previous mode is restored.
    """
    check_flow_args(steps, eta, nu)
    was_training = net.training
    net.eval()
    log_r_means = []
    try:
        x = x.detach()
        for _ in range(steps):
            x.requires_grad_(True)
            with torch.enable_grad():
                out = net(x)
                potential = pairing.f_prime(out)
                if extra_potential is not None:
                    potential = potential + extra_potential(x)
                # Samples are independent (no batch statistics), so the gradient of the sum
                # is each sample's own gradient.
                (grad,) = torch.autograd.grad(potential.sum(), x)
            if return_log_r:
                log_r_means.append(pairing.log_r(out.detach()).mean())
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (x.detach() - eta * grad + nu * noise).detach()
        if return_log_r:
            with torch.no_grad():
                log_r_means.append(pairing.log_r(net(x)).mean())
    finally:
        net.train(was_training)
    if return_log_r:
        return x, torch.stack(log_r_means).cpu()
    return x
