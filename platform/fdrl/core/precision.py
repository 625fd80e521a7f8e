"""Arithmetic precision of the network: ``fp32`` or ``bf16`` (autocast).

With ``bf16`` only the network's forward (and so its backward) runs under bfloat16 autocast:
convolutions and matmuls in bf16, accumulations and reductions as autocast decides. Everything
the method's maths depends on stays in fp32: the network output is cast back before f'(r) and
the loss, and the sample x, the flow's step and noise, the optimizer state and the EMA never
leave fp32, so small steps (eta * grad) and the noise nu * xi are not lost to bf16 rounding.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device | str):
    """The context the network's forward runs in (a no-op for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def network_output(net: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """``net(x)`` at ``precision``, returned in fp32 for f'(r), the loss and the diagnostics."""
    with autocast(precision, x.device):
        out = net(x)
    return out.float()
