"""Class guidance: compose an unconditional ratio with a classifier (FDRL eqs. 29-31).

The guided target is p~(x) = p(x) p(y=n|x)^phi / Z (phi = 1: the class conditional p(x|y=n),
eq. 29; phi = 0: unconditional). Its ratio is r~ = q/p~ = r(x) (N p(y=n|x))^-phi, taking
Z = N^-phi (exact at phi = 0 and 1, N classes), so log r~ = log r - phi (log p(y=n|x) + log N).

Every pairing's unguided flow moves along -grad log r at its own speed s(r) = d f'/d log r
(LR-KL: 1; LR-JS: sigmoid(-log r); LR-logD: sigmoid(log r); LSIF-chi2: 2r). The guided flow keeps
that speed and takes the guided direction:

    x <- x - eta s(r) grad(log r - phi log p(y=n|x)) + nu xi

For LR-KL this is eq. 31. So phi is one guidance strength whatever the pairing: it weighs
grad log p(y|x) against grad log r. The speed is the pairing's at the network's own r, not at r~:
applying f' to r~ itself (s(r~)) multiplies LSIF's step by (N p(y=n|x))^-phi, which grows without
bound where the class is unlikely and made samples diverge at phi = 0.3 (BENCHMARKS.md,
"Compositions at their defaults"). Where LSIF's network gives r <= 0 the speed is 0 for the guide.

The paper writes eq. 31's step as 2 eta; the 2 scales both terms alike, so it is a step size
(``--eta``), not a guidance strength. The guide enters through the one sampler's
``extra_potential`` hook, so conditional samples keep the per-chunk seeding of unconditional ones.
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
    """The guide of one label (module docstring): called with (x, out), the term that
    ``fdrl.core.flow.flow`` adds to f'(out). The classifier must be in eval mode with frozen
    parameters."""

    def __init__(self, classifier: nn.Module, label: int, phi: float, pairing: Pairing):
        if not phi >= 0:
            raise ValueError(f"guidance weight phi must be >= 0, got {phi!r}")
        self.classifier, self.label, self.phi, self.pairing = classifier, int(label), float(phi), pairing

    def log_weight(self, x: torch.Tensor) -> torch.Tensor:
        """-phi * log(N p(y=label|x)) per sample: log r~ - log r."""
        log_p = torch.log_softmax(self.classifier(x).float(), dim=1)
        n = log_p.shape[1]
        if not 0 <= self.label < n:
            raise ValueError(f"label {self.label} outside the classifier's classes 0..{n - 1}")
        return -self.phi * (log_p[:, self.label] + math.log(n))

    def speed(self, out: torch.Tensor) -> torch.Tensor:
        """s(r) = d f'/d log r at the network's output, per sample, detached and >= 0."""
        o = out.detach().float().requires_grad_(True)
        with torch.enable_grad():
            (slope,) = torch.autograd.grad(self.pairing.f_prime(o).sum(), o)
        per_log_r = slope * o if self.pairing.output == "r" else slope  # d o / d log r = r or 1
        return per_log_r.clamp(min=0).detach()

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """s(r) * log_weight(x): with f'(out) its gradient is s(r) grad(log r - phi log p(y|x))."""
        if self.phi == 0:
            return torch.zeros_like(out, dtype=torch.float32)
        return self.speed(out) * self.log_weight(x)


def class_potential(classifier: nn.Module, label: int, phi: float, pairing: Pairing) -> ClassGuide:
    """The guide of eq. 29 with weight phi, for ``pairing``'s f' (module docstring)."""
    return ClassGuide(classifier, label, phi, pairing)


def frozen(classifier: nn.Module) -> nn.Module:
    """The classifier in eval mode without parameter gradients, as guidance needs it."""
    return classifier.eval().requires_grad_(False)
