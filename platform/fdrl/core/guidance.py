"""Class guidance: compose an unconditional ratio with a classifier (FDRL eqs. 29-31).

The guided flow is derived from its target, p~(x) = p(x) p(y=n|x)^phi / Z (phi = 1: the class
conditional p(x|y=n), eq. 29; phi = 0: unconditional). Its ratio is
r~ = q/p~ = r(x) (N p(y=n|x))^-phi, taking Z = N^-phi (exact at phi = 0 and 1, N classes), and the
flow uses the pairing's own f' of r~:

* LR pairings (output o = log r): o~ = o - phi (log p(y=n|x) + log N). For LR-KL, f' = o~ gives
  eq. 31: x <- x - eta grad(log r - phi log p(y=n|x)) + nu xi. The paper writes the step as 2 eta;
  the 2 scales both terms alike, so it is a step size (``--eta``), not a guidance strength.
* LSIF (output o = r): o~ = o (N p(y=n|x))^-phi where o > 0 (a ratio; where the network's r is
  not positive it is left alone), and f' = 2 o~.

So phi is the same strength for every pairing: near r = 1 the drift is grad log r - phi grad log p
up to a positive factor. (Adding -phi log p(y|x) to f' instead, as before, made LSIF's guidance
relatively half as strong and scale-dependent on r.)

The guide enters through the one sampler's ``extra_potential`` hook, so conditional samples keep
the per-chunk seeding of unconditional ones.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from fdrl.core.divergences import Pairing


def check_classifier_fits(classifier: nn.Module, in_shape: Sequence[int], num_classes: int,
                          labels: Sequence[int]) -> None:
    """Refuse a classifier whose input shape is not the model's, or labels it does not know."""
    probe = torch.zeros(1, *in_shape)
    try:
        with torch.no_grad():
            out = classifier(probe)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"the classifier does not take the model's images of shape "
                         f"{tuple(in_shape)}: {err}") from None
    if out.shape != (1, num_classes):
        raise ValueError(f"the classifier maps a {tuple(in_shape)} image to {tuple(out.shape[1:])}, "
                         f"expected {num_classes} class logits")
    bad = [int(n) for n in labels if not 0 <= int(n) < num_classes]
    if bad:
        raise ValueError(f"label(s) {bad} outside the classifier's classes 0..{num_classes - 1}")


class ClassGuide:
    """The guided output o~ of one label (module docstring); ``fdrl.core.flow.flow`` applies the
    pairing's f' to it. The classifier must be in eval mode with frozen parameters."""

    def __init__(self, classifier: nn.Module, label: int, phi: float, pairing: Pairing):
        if not phi >= 0:
            raise ValueError(f"guidance weight phi must be >= 0, got {phi!r}")
        self.classifier, self.label, self.phi, self.pairing = classifier, int(label), float(phi), pairing

    def log_weight(self, x: torch.Tensor) -> torch.Tensor:
        """-phi * log(N p(y=label|x)) per sample: log of the factor r~/r."""
        log_p = torch.log_softmax(self.classifier(x).float(), dim=1)
        n = log_p.shape[1]
        if not 0 <= self.label < n:
            raise ValueError(f"label {self.label} outside the classifier's classes 0..{n - 1}")
        return -self.phi * (log_p[:, self.label] + math.log(n))

    def guided_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.phi == 0:
            return out
        w = self.log_weight(x)
        if self.pairing.output == "log_r":
            return out + w
        return torch.where(out > 0, out * w.exp(), out)


def class_potential(classifier: nn.Module, label: int, phi: float, pairing: Pairing) -> ClassGuide:
    """The guide of eq. 29 with weight phi, for ``pairing``'s f' (module docstring)."""
    return ClassGuide(classifier, label, phi, pairing)


def frozen(classifier: nn.Module) -> nn.Module:
    """The classifier in eval mode without parameter gradients, as guidance needs it."""
    return classifier.eval().requires_grad_(False)
