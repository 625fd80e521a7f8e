"""Class guidance: compose an unconditional ratio with a classifier (FDRL eqs. 29-31).

With p(y=n|x) = p(x|y=n) / (N p(x)), the conditional ratio is r(x|y=n) = r(x) / (N p(y=n|x)).
For LR-KL, f'(r) = log r, so flowing with it adds -phi * log p(y=n|x) to the potential:
x <- x - eta * grad(log r(x) - phi * log p(y=n|x)) + nu * xi  (eq. 31; the paper writes the step
as 2 eta, which is ``--eta`` doubled). For the other pairings the same term is added to their
f'(r), the usual classifier-guidance approximation. phi weighs the classifier (the paper: 0.1).

The term enters through the one sampler's ``extra_potential`` hook, so conditional samples keep
the per-chunk seeding of unconditional ones.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fdrl.core.flow import Potential


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


def class_potential(classifier: nn.Module, label: int, phi: float) -> Potential:
    """x -> -phi * log p(y=label | x), per sample: the extra potential of eq. 31.

    The classifier must be in eval mode with frozen parameters (only input gradients flow)."""
    if not phi >= 0:
        raise ValueError(f"guidance weight phi must be >= 0, got {phi!r}")
    label = int(label)

    def potential(x: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(classifier(x), dim=1)
        if not 0 <= label < log_p.shape[1]:
            raise ValueError(f"label {label} outside the classifier's classes 0..{log_p.shape[1] - 1}")
        return -phi * log_p[:, label]

    return potential


def frozen(classifier: nn.Module) -> nn.Module:
    """The classifier in eval mode without parameter gradients, as guidance needs it."""
    return classifier.eval().requires_grad_(False)
