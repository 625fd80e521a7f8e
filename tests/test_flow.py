import pytest
import torch

from fdrl.core.divergences import get_pairing
from fdrl.core.flow import flow
from fdrl.core.networks import build_network


@pytest.fixture
def net():
    torch.manual_seed(0)
    return build_network("mlp")


def test_flow_leaves_parameter_grads_none_and_restores_mode(net):
    net.train()
    x = torch.randn(32, 2)
    out = flow(net, x, get_pairing("lr-kl"), steps=5, eta=0.5, nu=0.01,
               generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in net.parameters())
    assert net.training
    assert not out.requires_grad and out.grad_fn is None
    assert out.shape == x.shape and not torch.equal(out, x)


def test_flow_runs_network_in_eval_mode(net):
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    flow(net, torch.randn(4, 2), get_pairing("lr-kl"), steps=3, eta=1.0, nu=0.0)
    assert seen and not any(seen)


def test_flow_is_gradient_descent_on_f_prime(net):
    """One noiseless step equals x - eta * grad f'(r(x)) computed independently."""
    pairing = get_pairing("lsif-chi2")
    x = torch.randn(8, 2, requires_grad=True)
    (grad,) = torch.autograd.grad((2 * net(x)).sum(), x)
    expected = x.detach() - 0.3 * grad
    got = flow(net, x.detach(), pairing, steps=1, eta=0.3, nu=0.0)
    torch.testing.assert_close(got, expected)


def test_flow_same_generator_same_result_and_log_r_trace(net):
    pairing = get_pairing("lr-js")
    x = torch.randn(16, 2)
    a, log_r = flow(net, x, pairing, 4, 1.0, 0.1, torch.Generator().manual_seed(3),
                    return_log_r=True)
    b = flow(net, x, pairing, 4, 1.0, 0.1, torch.Generator().manual_seed(3))
    c = flow(net, x, pairing, 4, 1.0, 0.1, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert log_r.shape == (5,)
    torch.testing.assert_close(log_r[-1], net(a).mean().detach())


def test_extra_potential_enters_the_gradient(net):
    pairing = get_pairing("lr-kl")
    x = torch.randn(8, 2)
    plain = flow(net, x, pairing, 1, 1.0, 0.0)
    pulled = flow(net, x, pairing, 1, 1.0, 0.0, extra_potential=lambda z, _out: (z**2).sum(-1))
    torch.testing.assert_close(pulled, plain - 2 * x)  # grad of |x|^2 is 2x


def test_a_bounded_flow_is_the_step_projected_onto_the_box(net):
    """Each step is taken, then clamped to [-bound, bound]: one step equals the unbounded step
    clamped, and many steps never leave the box."""
    pairing = get_pairing("lsif-chi2")
    x = 0.9 * torch.rand(64, 2).mul(2).sub(1)
    free = flow(net, x, pairing, 1, 5.0, 0.1, torch.Generator().manual_seed(0))
    bounded = flow(net, x, pairing, 1, 5.0, 0.1, torch.Generator().manual_seed(0), bound=1.0)
    assert free.abs().max() > 1  # the test would pass vacuously otherwise
    torch.testing.assert_close(bounded, free.clamp(-1, 1))
    long = flow(net, x, pairing, 50, 5.0, 0.1, torch.Generator().manual_seed(0), bound=1.0)
    assert long.abs().max() <= 1


def test_a_models_flow_bound_comes_from_its_config_and_bounds_its_samples(net):
    from fdrl.config import TrainConfig
    from fdrl.core.flow import FlowSettings
    from fdrl.core.sampler import sample

    settings = FlowSettings.from_config(TrainConfig(flow_steps=5, extra_steps=5, eta=5.0, flow_bound=1.0))
    assert settings.bound == 1.0 and FlowSettings.from_config(TrainConfig()).bound == 0.0
    out = sample(net, get_pairing("lsif-chi2"), settings, seed=0, start=torch.rand(64, 2) * 2 - 1)
    assert out.x.abs().max() <= 1
    with pytest.raises(ValueError, match="flow bound must be >= 0"):
        FlowSettings(flow_steps=1, extra_steps=0, eta=1.0, nu=0.0, bound=-1.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=0, eta=1.0, nu=0.0), "K must be an integer >= 1"),
    (dict(steps=2, eta=0.0, nu=0.0), "eta must be > 0"),
    (dict(steps=2, eta=-1.0, nu=0.0), "eta must be > 0"),
    (dict(steps=2, eta=1.0, nu=-0.1), "nu must be >= 0"),
])
def test_bad_flow_arguments(net, kwargs, message):
    with pytest.raises(ValueError, match=message):
        flow(net, torch.randn(2, 2), get_pairing("lr-kl"), **kwargs)


def test_wrong_input_shape_is_named(net):
    with pytest.raises(ValueError, match=r"got \(4, 3\)"):
        flow(net, torch.randn(4, 3), get_pairing("lr-kl"), 1, 1.0, 0.0)
