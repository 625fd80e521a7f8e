"""bf16 autocast and the maths-preserving fast paths of the flow (frozen weights, cached spectral
norm, in-place buffers, channels_last) against the plain fp32 computation."""

import contextlib
import copy

import pytest
import torch

from fdrl.core.acceleration import to_channels_last
from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings, flow
from fdrl.core.networks import build_network
from fdrl.core.priors import make_simple_prior
from fdrl.core.step import make_state, train_step

# Stated tolerance: over 3 flow steps (eta = 3, nu = 0.01) the bf16 displacement x_K - x_0 stays
# within 3% (relative L2) of the fp32 one, and within 5e-3 per pixel. bf16 keeps 8 mantissa
# bits (0.4% per rounding); measured here: 0.06-0.5%.
REL_TOL, ABS_TOL = 0.03, 5e-3


def _net(arch, **kw):
    torch.manual_seed(0)
    return build_network(arch, **kw)


def _naive_flow(net, x, pairing, steps, eta, nu, gen):
    """The flow as eq. 9 states it, with none of the fast paths."""
    net.eval()
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(pairing.f_prime(net(x)).sum(), x)
        x = x.detach() - eta * grad + nu * torch.randn(x.shape, generator=gen)
    return x.detach()


@pytest.mark.parametrize("arch,kw", [("mnist32", {}), ("cat2dog64", {})])  # cat2dog: spectral norm
@pytest.mark.parametrize("pairing", ["lsif-chi2", "lr-kl"])
def test_bf16_flow_agrees_with_fp32(arch, kw, pairing):
    net = _net(arch, **kw)
    x = torch.rand(4, *net.in_shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    fp32 = flow(net, x, get_pairing(pairing), 3, 3.0, 0.01, torch.Generator().manual_seed(1))
    bf16 = flow(net, x, get_pairing(pairing), 3, 3.0, 0.01, torch.Generator().manual_seed(1),
                precision="bf16")
    assert bf16.dtype == torch.float32  # the sample itself never leaves fp32
    moved32, moved16 = fp32 - x, bf16 - x
    assert (moved16 - moved32).norm() <= REL_TOL * moved32.norm()
    assert (moved16 - moved32).abs().max() <= ABS_TOL
    assert not torch.equal(fp32, bf16)  # autocast did run


def test_fast_flow_equals_the_naive_flow_and_keeps_the_input():
    net = _net("mnist32")
    x = torch.rand(4, *net.in_shape) * 2 - 1
    x_before = x.clone()
    fast = flow(net, x, get_pairing("lr-kl"), 3, 3.0, 0.01, torch.Generator().manual_seed(5))
    naive = _naive_flow(net, x, get_pairing("lr-kl"), 3, 3.0, 0.01, torch.Generator().manual_seed(5))
    assert torch.equal(fast, naive)  # the same arithmetic in the same order: bit-identical
    assert torch.equal(x, x_before)


def test_channels_last_flow_equals_contiguous():
    net = _net("mnist32")
    fast = to_channels_last(copy.deepcopy(net))
    assert fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, *net.in_shape) * 2 - 1
    a = flow(net, x, get_pairing("lsif-chi2"), 3, 3.0, 0.01, torch.Generator().manual_seed(1))
    b = flow(fast, x, get_pairing("lsif-chi2"), 3, 3.0, 0.01, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_spectral_norm_flow_does_no_power_iterations_and_restores_flags():
    net = _net("cat2dog64")  # spectral norm on every conv and linear layer
    net.train()
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    assert any(k.endswith("_u") for k in buffers)
    x = torch.rand(2, *net.in_shape) * 2 - 1
    fast = flow(net, x, get_pairing("lsif-chi2"), 2, 3.0, 0.01, torch.Generator().manual_seed(1))
    assert all(torch.equal(v, dict(net.named_buffers())[k]) for k, v in buffers.items())
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())
    naive = _naive_flow(net, x, get_pairing("lsif-chi2"), 2, 3.0, 0.01, torch.Generator().manual_seed(1))
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-6)  # cached W/sigma: same values
    # In train mode a forward does iterate, so the check above could fail.
    net.train()(x)
    assert not all(torch.equal(v, dict(net.named_buffers())[k]) for k, v in buffers.items())


def test_bf16_step_keeps_loss_state_and_ema_in_fp32_and_agrees_with_fp32():
    losses = {}
    for precision in ("fp32", "bf16"):
        state = make_state(_net("mnist32"), lr=1e-3)
        data = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
        m = train_step(state, data, make_simple_prior("uniform", (1, 32, 32)), get_pairing("lsif-chi2"),
                       FlowSettings(2, 0, 3.0, 0.01, precision), torch.Generator().manual_seed(4))
        losses[precision] = m["loss"]
        tensors = [*state.module.parameters(), *state.ema.parameters(),
                   *(v for s in state.optimizer.state.values() for v in s.values() if v.dim())]
        assert all(t.dtype == torch.float32 for t in tensors)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02, abs=1e-3)
    assert losses["bf16"] != losses["fp32"]


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid: fp32, bf16"):
        FlowSettings(1, 0, 1.0, 0.0, "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        flow(_net("mlp"), torch.randn(2, 2), get_pairing("lr-kl"), 1, 1.0, 0.0, precision="half")


def test_the_gpu_path_uses_the_same_autocast():
    """On a CUDA device the same function gives CUDA bf16 autocast (no GPU here: only its type)."""
    from fdrl.core.precision import autocast

    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        ctx = autocast("bf16", "cuda:0")
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast("fp32", "cuda:0"), torch.autocast)
