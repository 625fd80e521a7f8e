"""DGflow's maths (fdrl.core.dgflow) against closed forms.

An analytic discriminator on 2D Gaussians: d(x) = log mu(x) - log rho0(x) is the optimal logit
between data mu and generator rho0, so exp(-d) is the exact ratio rho0/mu. DGflow-KL's drift is
then grad log mu - grad log rho0 (stale, as in the paper):
* finite time (the paper's regime, gamma = 0.01): with equal covariances the drift is the constant
  mean difference, so after eta * steps = 1 the samples sit on the target mean;
* long run with gamma = 1: the flow's stationary law is prop. to mu / rho0, the target up to
  rho0's (broad) correction: mean and covariance of the target within a stated tolerance.
The same checks fail with the drift's sign flipped.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fdrl.core.dgflow import (Logit, RefineSettings, auto_steps, lipschitz_estimate, refine_chunk,
                              paper_settings, refine)


class GaussianLogPdf(nn.Module):
    """log N(x; mean, cov) up to its constant (constants cancel in gradients)."""

    def __init__(self, mean, cov):
        super().__init__()
        self.mean, self.precision = torch.tensor(mean), torch.linalg.inv(torch.tensor(cov))

    def forward(self, x):
        u = x - self.mean
        return -0.5 * ((u @ self.precision) * u).sum(1)


class AnalyticLogit(nn.Module):
    """d(x) = sign * (log mu(x) - log rho0(x)); sign = -1 flips the drift."""

    def __init__(self, target, base, sign=1.0):
        super().__init__()
        self.target, self.base, self.sign = target, base, sign

    def forward(self, x):
        return self.sign * (self.target(x) - self.base(x))


class ShiftGenerator(nn.Module):
    """g(z) = mean + L z: a generator of N(mean, L L^T)."""

    def __init__(self, mean, cov):
        super().__init__()
        self.mean = torch.tensor(mean)
        self.chol = torch.linalg.cholesky(torch.tensor(cov))

    def forward(self, z):
        return self.mean + z @ self.chol.T


TARGET_MEAN, TARGET_COV = [1.0, -0.5], [[0.5, 0.2], [0.2, 0.3]]
TOL_MEAN, TOL_COV = 0.1, 0.1  # 4000 samples: standard errors ~0.01 (mean) and ~0.01 (cov)


def moments(x):
    x = x.double().numpy()
    return x.mean(0), np.cov(x.T)


def close_to(x, mean, cov, tol_mean=TOL_MEAN, tol_cov=TOL_COV):
    m, c = moments(x)
    return bool(np.abs(m - mean).max() < tol_mean and np.abs(c - np.array(cov)).max() < tol_cov)


def stationary_run(sign):
    base_mean, base_cov = [0.0, 0.0], [[16.0, 0.0], [0.0, 16.0]]  # a poor, broad generator
    logit = AnalyticLogit(GaussianLogPdf(TARGET_MEAN, TARGET_COV), GaussianLogPdf(base_mean, base_cov), sign)
    # T = 10: ~16 relaxation times of the slowest direction (variance 0.62)
    settings = RefineSettings(method="dgflow", f="kl", space="data", steps=500, eta=0.02, gamma=1.0)
    # one 4000-sample chunk: the chunk size is part of the seeding, and this keeps the test fast
    out = refine(settings, logit, 4000, seed=0, generator=ShiftGenerator(base_mean, base_cov),
                 latent_dim=2, data_shape=(2,), chunk=4000)
    return out


def test_dgflow_kl_reaches_target_moments_with_noise():
    out = stationary_run(+1.0)
    assert not close_to(out.stages[0], TARGET_MEAN, TARGET_COV)  # the base is far off
    assert close_to(out.x, TARGET_MEAN, TARGET_COV), moments(out.x)
    assert out.log_r[-1] < out.log_r[0] - 1.0  # the log-ratio estimate falls as samples improve


def test_flipped_drift_fails_the_same_check():
    out = stationary_run(-1.0)
    assert not close_to(out.x, TARGET_MEAN, TARGET_COV)


@pytest.mark.parametrize("sign, lands", [(+1.0, True), (-1.0, False)])
def test_finite_time_mean_shift(sign, lands):
    # Equal covariances: the drift is target_mean - base_mean everywhere; eta * steps = 1.
    base_mean, cov = [-1.0, 2.0], [[1.0, 0.0], [0.0, 1.0]]
    logit = AnalyticLogit(GaussianLogPdf(TARGET_MEAN, cov), GaussianLogPdf(base_mean, cov), sign)
    settings = paper_settings("dgflow", "kl")  # eta 0.01, 100 steps, gamma 0.01, data space
    out = refine(settings, logit, 2000, seed=1, generator=ShiftGenerator(base_mean, cov),
                 latent_dim=2, data_shape=(2,), chunk=2000)
    # gamma adds 2 * gamma * T = 0.02 to the variance
    assert close_to(out.x, TARGET_MEAN, cov, 0.06, 0.06) is lands


def test_latent_space_matches_data_space_for_a_shift_generator():
    # g(z) = mean + z has unit Jacobian: latent and data space DGflow are the same flow.
    cov = [[1.0, 0.0], [0.0, 1.0]]
    logit = AnalyticLogit(GaussianLogPdf(TARGET_MEAN, cov), GaussianLogPdf([0.0, 0.0], cov))
    gen = ShiftGenerator([0.0, 0.0], cov)
    kw = dict(generator=gen, latent_dim=2, data_shape=(2,))
    data = refine(RefineSettings(space="data", steps=20, eta=0.05, gamma=0.01), logit, 100, 3, **kw)
    latent = refine(RefineSettings(space="latent", steps=20, eta=0.05, gamma=0.01), logit, 100, 3, **kw)
    torch.testing.assert_close(data.x, latent.x, atol=1e-5, rtol=0)
    torch.testing.assert_close(data.stages[0], latent.stages[0])


@pytest.mark.parametrize("method, f, space", [("dgflow", "kl", "latent"), ("dgflow", "js", "data"),
                                              ("dgflow", "logd", "data"), ("ddls", "kl", "latent"),
                                              ("dot", "kl", "data")])
def test_same_seed_same_arrays_for_any_batching(method, f, space):
    cov = [[1.0, 0.0], [0.0, 1.0]]
    logit = AnalyticLogit(GaussianLogPdf(TARGET_MEAN, cov), GaussianLogPdf([0.0, 0.0], cov))
    kw = dict(generator=ShiftGenerator([0.0, 0.0], cov), latent_dim=2, data_shape=(2,), k_eff=1.0)
    s = paper_settings(method, f, space=space, steps=10)
    a = refine(s, logit, 150, seed=7, **kw)
    b = refine(s, logit, 150, seed=7, **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.stages[0], b.stages[0])
    # chunks refined alone (as Ray actors refine them) equal the same rows of the whole run
    alone = [refine_chunk(s, logit, 7, index, size, **kw) for index, size in ((1, 64), (2, 22))]
    assert torch.equal(torch.cat([p.x for p in alone]), a.x[64:150])
    other = refine(s, logit, 150, seed=8, **kw)
    assert not torch.equal(a.stages[0], other.stages[0])
    assert not torch.equal(a.x, a.stages[0])


def test_velocities_of_each_f():
    # One noiseless step of size eta moves x by eta * s(d) * grad d, s = 1, sigmoid(d), sigmoid(-d).
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.7]])), lin.bias.fill_(0.4)
    logit = Logit(lin)
    x = torch.tensor([[0.5, 1.0], [-2.0, 0.1]])
    d = lin(x)[:, 0].detach()
    for f, s in (("kl", torch.ones_like(d)), ("js", torch.sigmoid(d)), ("logd", torch.sigmoid(-d))):
        out = refine(RefineSettings(f=f, space="data", steps=1, eta=0.1, gamma=0.0), logit, start=x)
        expected = x + 0.1 * s[:, None] * lin.weight.detach()
        torch.testing.assert_close(out.x, expected)


def test_dot_moves_toward_higher_critic_but_stays_close():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0]])), lin.bias.zero_()
    x = torch.zeros(64, 2)
    k = lipschitz_estimate(Logit(lin), torch.randn(256, 2))
    assert abs(k - 1.0) < 0.05
    out = refine(paper_settings("dot"), Logit(lin), start=x, k_eff=k)
    moved = out.x - x
    assert (moved[:, 0] > 0).all() and moved.norm(dim=1).max() < 1.5


def test_auto_steps_stops_when_the_curve_flattens():
    curve = [10 * math.exp(-k / 5) for k in range(100)]
    k = auto_steps(curve, tol=0.01)
    assert 20 < k < 40  # the curve's slope over 5 steps falls below 0.01 near k ~ 30
    assert auto_steps(list(range(50, 0, -1)), tol=0.5) == 49  # never flattens: all steps


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown f"):
        RefineSettings(f="hellinger")
    with pytest.raises(ValueError, match="unknown method"):
        RefineSettings(method="mh")
    with pytest.raises(ValueError, match="gamma"):
        RefineSettings(gamma=-0.1)
    with pytest.raises(ValueError, match="unknown space"):
        RefineSettings(space="pixel")
    with pytest.raises(ValueError, match="DDLS"):
        RefineSettings(method="ddls", space="data")
    vector_critic = nn.Linear(2, 8)
    with pytest.raises(ValueError, match="corrector"):
        refine(RefineSettings(space="data", steps=1), Logit(vector_critic), start=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="latent"):
        refine(RefineSettings(space="latent", steps=1), Logit(nn.Linear(2, 1)), start=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="k_eff"):
        refine(paper_settings("dot"), Logit(nn.Linear(2, 1)), start=torch.zeros(4, 2))
