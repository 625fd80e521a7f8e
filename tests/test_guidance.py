"""Class guidance (FDRL eqs. 29-31) through the one sampler: the drift of each pairing, derived
from the target p(x) p(y|x)^phi, checks, reproducibility."""

import numpy as np
import pytest
import torch
from torch import nn

from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.guidance import check_classifier_fits, class_potential, frozen
from fdrl.core.sampler import sample

D, N_CLASSES = 6, 3


class LinearLogR(nn.Module):
    """log r(x) = a . x: a tiny ratio network with a hand-computable gradient."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1) @ self.a


def linear_classifier(w, b):
    clf = nn.Linear(D, N_CLASSES)
    with torch.no_grad():
        clf.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        clf.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return frozen(clf)


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    a, w, b = rng.normal(size=D), rng.normal(size=(N_CLASSES, D)), rng.normal(size=N_CLASSES)
    x0 = rng.normal(size=(5, D))
    return a, w, b, x0


def grad_log_softmax(w, b, x, label):
    """d/dx log p(y=label|x) for logits W x + b: W_label - sum_k p_k W_k (by hand, numpy)."""
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return w[label][None, :] - p @ w


@pytest.mark.parametrize("phi", [0.05, 0.3])
@pytest.mark.parametrize("label", [0, 2])
def test_conditional_drift_is_unconditional_plus_phi_grad_log_p(setup, phi, label):
    a, w, b, x0 = setup
    net, clf, pairing = LinearLogR(a), linear_classifier(w, b), get_pairing("lr-kl")
    eta = 0.7
    one_step = FlowSettings(flow_steps=1, extra_steps=0, eta=eta, nu=0.0)
    start = torch.as_tensor(x0, dtype=torch.float32)
    plain = sample(net, pairing, one_step, seed=0, start=start).x.double().numpy()
    guided = sample(net, pairing, one_step, seed=0, start=start,
                    extra_potential=class_potential(clf, label, phi, pairing)).x.double().numpy()
    # Unconditional LR-KL drift: -eta * grad log r = -eta * a.
    np.testing.assert_allclose(plain, x0 - eta * a, atol=1e-5)
    # Guidance adds eta * phi * grad log p(y|x).
    np.testing.assert_allclose(guided - plain, eta * phi * grad_log_softmax(w, b, x0, label),
                               atol=1e-5)
    assert np.abs(guided - plain).max() > 1e-3  # the term is not negligible here


def test_guided_samples_are_reproducible_by_seed_and_differ_by_label(setup):
    a, w, b, _ = setup
    net, clf, pairing = LinearLogR(a), linear_classifier(w, b), get_pairing("lr-kl")
    from fdrl.core.priors import make_simple_prior

    prior = make_simple_prior("gaussian", (D,))
    flow = FlowSettings(flow_steps=3, extra_steps=2, eta=0.1, nu=0.05)
    run = lambda seed, label, chunk=64: sample(net, pairing, flow, 70, seed, prior=prior, chunk=chunk,
                                               extra_potential=class_potential(clf, label, 0.5, pairing)).x
    first = run(3, 1)
    assert torch.equal(first, run(3, 1))
    assert not torch.equal(first, run(4, 1))
    assert not torch.equal(first, run(3, 2))


def test_bad_labels_shapes_and_phi_are_refused(setup):
    a, w, b, _ = setup
    clf = linear_classifier(w, b)
    check_classifier_fits(clf, (D,), N_CLASSES, [0, 1, 2])
    with pytest.raises(ValueError, match=r"label\(s\) \[3\] outside the classifier's classes 0..2"):
        check_classifier_fits(clf, (D,), N_CLASSES, [0, 3])
    with pytest.raises(ValueError, match="does not take the model's images of shape"):
        check_classifier_fits(clf, (1, 4, 4), N_CLASSES, [0])
    lr = get_pairing("lr-kl")
    with pytest.raises(ValueError, match="phi must be >= 0"):
        class_potential(clf, 0, -0.1, lr)
    with pytest.raises(ValueError, match="outside the classifier's classes"):
        class_potential(clf, 5, 0.1, lr)(torch.zeros(2, D), torch.zeros(2))


class ExpR(nn.Module):
    """r(x) = exp(a . x) as LSIF's output (r itself): the same ratio as LinearLogR."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float32))

    def forward(self, x):
        return torch.exp(x.flatten(1) @ self.a)


@pytest.mark.parametrize("pairing_name", ["lsif-chi2", "lr-js", "lr-logd"])
@pytest.mark.parametrize("phi", [0.0, 0.3, 1.0])
def test_every_pairing_takes_the_guided_direction_at_its_own_speed(setup, phi, pairing_name):
    """x <- x - eta s(r) (a - phi grad log p): LR-KL's guided direction, scaled by the pairing's
    unguided speed at the network's r (LSIF: 2r, JS: sigmoid(-log r), logD: sigmoid(log r)), so
    phi means one strength whatever the pairing."""
    a, w, b, x0 = setup
    a = 0.3 * a
    clf, label, eta = linear_classifier(w, b), 1, 0.05
    one_step = FlowSettings(flow_steps=1, extra_steps=0, eta=eta, nu=0.0)
    start = torch.as_tensor(x0, dtype=torch.float32)
    pairing = get_pairing(pairing_name)
    net = ExpR(a) if pairing.output == "r" else LinearLogR(a)
    moved = x0 - sample(net, pairing, one_step, seed=0, start=start,
                        extra_potential=class_potential(clf, label, phi, pairing)).x.double().numpy()
    log_r = x0 @ a
    speed = {"lsif-chi2": 2 * np.exp(log_r), "lr-js": 1 / (1 + np.exp(log_r)),
             "lr-logd": 1 / (1 + np.exp(-log_r))}[pairing_name]
    direction = a[None, :] - phi * grad_log_softmax(w, b, x0, label)
    np.testing.assert_allclose(moved, eta * speed[:, None] * direction, rtol=1e-4, atol=1e-6)


def test_lsif_guidance_stays_bounded_where_the_class_is_unlikely(setup):
    """Far from the label's region p(y|x) is ~1e-40: the guided step stays the size of the
    classifier's own gradient, where f' of r~ = r (N p)^-phi would be about 1e12 times larger."""
    a, w, b, _ = setup
    clf = linear_classifier(30 * w, 30 * b)
    far = torch.as_tensor(-4.0 * w[1][None, :], dtype=torch.float32)  # deep in other classes
    with torch.no_grad():
        log_p = torch.log_softmax(clf(far), dim=1)[0, 1].item()
    assert log_p < -50
    pairing, eta = get_pairing("lsif-chi2"), 0.05
    one_step = FlowSettings(flow_steps=1, extra_steps=0, eta=eta, nu=0.0)
    moved = far - sample(ExpR(0.0 * a), pairing, one_step, seed=0, start=far,
                         extra_potential=class_potential(clf, 1, 1.0, pairing)).x
    bound = 2 * eta * 30 * 2 * np.abs(w).sum(1).max()  # s = 2r = 2, |grad log p| <= 2 max |30 W_k|
    assert torch.isfinite(moved).all() and moved.abs().max().item() <= bound


def test_lsif_guidance_leaves_a_non_positive_ratio_alone(setup):
    a, w, b, _ = setup
    guide = class_potential(linear_classifier(w, b), 0, 1.0, get_pairing("lsif-chi2"))
    out = torch.tensor([-0.5, 0.0, 2.0])
    assert guide.speed(out).tolist() == [0.0, 0.0, 4.0]
    x = torch.zeros(3, D)
    assert guide(x, out)[:2].tolist() == [0.0, 0.0] and guide(x, out)[2] != 0  # guided only at r > 0
