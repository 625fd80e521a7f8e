"""Bregman losses for the density ratio r(x) = q~(x)/p(x), paired with the f' that drives the flow.

Stable forms of the FDRL paper, appendix D. The network output ``o`` is r itself for LSIF and
log r for the LR pairings; constants in f' are dropped because only its gradient enters the flow.

| pairing   | loss (batch means)                      | f'(r) in the flow |
|-----------|-----------------------------------------|-------------------|
| lsif-chi2 | 0.5*E_p[o^2] - E_q[o]                   | 2*o               |
| lr-kl     | -E_p[logsig(-o)] - E_q[logsig(o)]       | o                 |
| lr-js     | (LR loss)                               | logsig(o)         |
| lr-logd   | (LR loss)                               | -logsig(-o)       |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# Floor for log r when the LSIF output (r itself) is not positive; only used for diagnostics.
_LSIF_LOG_FLOOR = 1e-6


def lsif_loss(out_data: torch.Tensor, out_flowed: torch.Tensor) -> torch.Tensor:
    return 0.5 * out_data.pow(2).mean() - out_flowed.mean()


def lr_loss(out_data: torch.Tensor, out_flowed: torch.Tensor) -> torch.Tensor:
    # Logistic regression with flowed samples as the positive class: its optimum is o = log(q~/p).
    return -F.logsigmoid(-out_data).mean() - F.logsigmoid(out_flowed).mean()


@dataclass(frozen=True)
class Pairing:
    """A Bregman loss with the f' it is paired with. ``output`` says what the network emits."""

    name: str
    output: str  # "r" (LSIF) or "log_r" (LR)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    f_prime: Callable[[torch.Tensor], torch.Tensor]

    def log_r(self, out: torch.Tensor) -> torch.Tensor:
        """log r from the raw network output (the KL diagnostic is the mean of this on q~)."""
        if self.output == "log_r":
            return out
        return torch.log(out.clamp_min(_LSIF_LOG_FLOOR))


PAIRINGS: dict[str, Pairing] = {
    p.name: p
    for p in (
        Pairing("lsif-chi2", "r", lsif_loss, lambda o: 2.0 * o),
        Pairing("lr-kl", "log_r", lr_loss, lambda o: o),
        Pairing("lr-js", "log_r", lr_loss, F.logsigmoid),
        Pairing("lr-logd", "log_r", lr_loss, lambda o: -F.logsigmoid(-o)),
    )
}


def get_pairing(name: str) -> Pairing:
    try:
        return PAIRINGS[name]
    except KeyError:
        raise ValueError(
            f"unknown pairing {name!r}; valid pairings are: {', '.join(sorted(PAIRINGS))}"
        ) from None
