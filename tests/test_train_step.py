import pytest
import torch

from fdrl.core.divergences import get_pairing
from fdrl.core.networks import build_network
from fdrl.core.priors import make_simple_prior
from fdrl.core.flow import FlowSettings
from fdrl.core.step import NonFiniteLossError, lr_multiplier, make_state, train_step


def _setup(seed=0, arch="mlp"):
    torch.manual_seed(seed)
    net = build_network(arch)
    return make_state(net, lr=1e-3, decay_steps=[2]), torch.Generator().manual_seed(seed)


def test_step_updates_weights_ema_and_returns_metrics():
    state, gen = _setup()
    before = [p.detach().clone() for p in state.model.parameters()]
    ema_before = [p.detach().clone() for p in state.ema.parameters()]
    prior = make_simple_prior("gaussian", (2,))
    m = train_step(state, torch.randn(64, 2), prior, get_pairing("lr-kl"), FlowSettings(3, 0, 1.0, 0.01), gen)
    assert set(m) == {"loss", "log_r_data", "log_r_flowed", "grad_norm", "lr"}
    assert m["grad_norm"] > 0 and state.step == 1
    changed = [not torch.equal(a, b) for a, b in zip(before, state.model.parameters())]
    assert all(changed)
    # EMA moved by (1 - m) of the way: ema = 0.998 * old + 0.002 * new
    for e_old, e_new, p in zip(ema_before, state.ema.parameters(), state.model.parameters()):
        torch.testing.assert_close(e_new, 0.998 * e_old + 0.002 * p.detach())


def test_learning_rate_decays_at_milestones():
    f = lr_multiplier([80, 90])
    assert [f(0), f(79), f(80), f(89), f(90)] == [1, 1, pytest.approx(0.1), pytest.approx(0.1),
                                                  pytest.approx(0.01)]
    state, gen = _setup()
    prior = make_simple_prior("gaussian", (2,))
    lrs = [train_step(state, torch.randn(8, 2), prior, get_pairing("lr-kl"),
                      FlowSettings(1, 0, 1.0, 0.0), gen)["lr"] for _ in range(3)]
    assert lrs == [1e-3, 1e-3, pytest.approx(1e-4)]


def test_same_seed_same_weights():
    results = []
    for _ in range(2):
        state, gen = _setup(seed=7, arch="mnist32")
        prior = make_simple_prior("uniform", (1, 32, 32), clamp=1.0)
        data = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        for _ in range(2):
            train_step(state, data, prior, get_pairing("lsif-chi2"), FlowSettings(2, 0, 3.0, 0.01), gen)
        results.append(torch.cat([p.flatten() for p in state.ema.parameters()]))
    assert torch.equal(*results)


def test_non_finite_loss_names_step_and_values():
    state, gen = _setup()
    state.step = 41
    data = torch.randn(8, 2)
    data[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 41: loss=nan.*on data=nan"):
        train_step(state, data, make_simple_prior("gaussian", (2,)), get_pairing("lsif-chi2"),
                   FlowSettings(1, 0, 1.0, 0.0), gen, dequant_std=0.0)


@pytest.mark.parametrize("steps,eta,nu", [(0, 1.0, 0.0), (3, 0.0, 0.0), (3, -2.0, 0.0)])
def test_flow_params_are_validated(steps, eta, nu):
    with pytest.raises(ValueError):
        FlowSettings(steps, 0, eta, nu)
