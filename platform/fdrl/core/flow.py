"""The Euler-Maruyama flow x <- x - eta * grad_x f'(r(x)) + nu * xi  (FDRL eq. 9).

The same function pushes prior samples K steps during training and K + kappa steps when sampling.
Only input gradients are taken: parameters never accumulate ``.grad``, and no graph survives a step.

Fast paths that leave the maths alone: the parameters are frozen for the flow (no weight
gradients are ever built), spectral-norm weights are computed once per flow rather than once per
step (eval mode: no power iterations; the weights are fixed), and x and the noise live in two
buffers updated in place. ``precision="bf16"`` runs only the network under bf16 autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from fdrl.core.divergences import Pairing
from fdrl.core.precision import check_precision, network_output

# An extra per-sample term of the flow's potential: called with the batch x and the network's
# output at x, it returns a tensor of shape (batch,) that is added to f'(r(x)). The output lets a
# term depend on r (class guidance scales its term by the pairing's speed at r).
Potential = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_flow_args(steps: int, eta: float, nu: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"flow steps K must be an integer >= 1, got {steps!r}")
    if not eta > 0:
        raise ValueError(f"flow step size eta must be > 0, got {eta!r}")
    if not nu >= 0:
        raise ValueError(f"flow noise nu must be >= 0, got {nu!r}")


@dataclass(frozen=True)
class FlowSettings:
    """The flow of a model: K steps in training, K + kappa when sampling, step eta, noise nu,
    and the precision the network runs at (``fdrl.core.precision``)."""

    flow_steps: int  # K
    extra_steps: int  # kappa
    eta: float
    nu: float
    precision: str = "fp32"  # fp32 | bf16 (autocast for the network only)
    bound: float = 0.0  # > 0: each step's x is clamped to [-bound, bound] (the data's box); 0: none

    def __post_init__(self):
        check_flow_args(self.flow_steps, self.eta, self.nu)
        check_precision(self.precision)
        if not self.bound >= 0:
            raise ValueError(f"flow bound must be >= 0 (0: unbounded), got {self.bound!r}")
        if not isinstance(self.extra_steps, int) or self.extra_steps < 0:
            raise ValueError(f"extra flow steps kappa must be an integer >= 0, got {self.extra_steps!r}")

    @property
    def sampling_steps(self) -> int:
        return self.flow_steps + self.extra_steps

    @classmethod
    def from_config(cls, config, **overrides) -> "FlowSettings":
        """From any object with flow_steps, extra_steps, eta and nu (and optionally precision and
        flow_bound); None overrides are ignored."""
        base = dict(flow_steps=config.flow_steps, extra_steps=config.extra_steps,
                    eta=config.eta, nu=config.nu, precision=getattr(config, "precision", "fp32"),
                    bound=getattr(config, "flow_bound", 0.0))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@contextlib.contextmanager
def frozen_for_flow(net: nn.Module):
    """Eval mode, no parameter gradients and cached spectral-norm weights, for one flow; the
    previous mode and requires_grad flags come back afterwards."""
    was_training = net.training
    params = list(net.parameters())
    flags = [p.requires_grad for p in params]
    net.eval().requires_grad_(False)
    try:
        with parametrize.cached():
            for module in net.modules():  # fill the cache now, in fp32, outside any autocast
                if parametrize.is_parametrized(module):
                    for name in module.parametrizations:
                        getattr(module, name)
            yield net
    finally:
        net.train(was_training)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


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
    precision: str = "fp32",
    bound: float = 0.0,
):
    """Run ``steps`` flow steps from ``x``; returns the flowed batch (detached, a new tensor).

    With ``return_log_r`` it returns ``(x, log_r)`` where ``log_r[k]`` is the batch mean of
    log r(x_k) for k = 0..steps: the KL diagnostic of the DGGF paper along the flow.
    ``net`` runs in eval mode for the duration and its previous mode is restored.
    ``precision`` is the network's (``fdrl.core.precision``); x, the step and the noise are fp32.
    ``bound`` > 0 clamps x to [-bound, bound] after every step.
    """
    check_flow_args(steps, eta, nu)
    check_precision(precision)
    log_r_means = []
    with frozen_for_flow(net):
        x = x.detach().clone()  # updated in place below; the caller's tensor is left alone
        noise, drift = torch.empty_like(x), torch.empty_like(x)
        for _ in range(steps):
            x_in = x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = network_output(net, x_in, precision)
                potential = pairing.f_prime(out)
                if extra_potential is not None:
                    potential = potential + extra_potential(x_in, out)
                # Samples are independent (no batch statistics), so the gradient of the sum
                # is each sample's own gradient.
                (grad,) = torch.autograd.grad(potential.sum(), x_in)
            if return_log_r:
                log_r_means.append(pairing.log_r(out.detach()).mean())
            with torch.no_grad():
                # x <- x - eta * grad + nu * xi; the noise is drawn even at nu = 0 so the
                # generator's stream does not depend on nu.
                torch.randn(x.shape, generator=generator, out=noise)
                # grad may be a view autograd shares (an expanded ones for a linear potential),
                # so it is scaled into our own buffer, never in place.
                torch.mul(grad, eta, out=drift)
                x.sub_(drift).add_(noise.mul_(nu))
                if bound:
                    x.clamp_(-bound, bound)
        if return_log_r:
            with torch.no_grad():
                log_r_means.append(pairing.log_r(network_output(net, x, precision)).mean())
    if return_log_r:
        return x, torch.stack(log_r_means).cpu()
    return x
