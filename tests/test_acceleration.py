"""torch.compile with a one-warning fallback, and the compile mode chosen per device (the CUDA
graphs path is chosen by the same function the CPU tests call)."""

import warnings

import pytest
import torch

from fdrl.core import acceleration
from fdrl.core.acceleration import CompileFallbackWarning, compile_mode, compile_network, is_compiled
from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings, flow
from fdrl.core.networks import build_network
from fdrl.core.priors import make_simple_prior
from fdrl.core.step import make_state, train_step


def _mlp():
    torch.manual_seed(0)
    return build_network("mlp")


def test_compile_mode_uses_cuda_graphs_only_on_gpu():
    assert compile_mode("cuda") == "reduce-overhead"
    assert compile_mode("cuda:1") == "reduce-overhead"
    assert compile_mode("cpu") == "default"


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(acceleration.shutil, "which", lambda name: None)
    net = _mlp()
    with pytest.warns(CompileFallbackWarning, match="no C compiler") as record:
        assert compile_network(net) is False
    assert len(record) == 1 and not is_compiled(net)
    x = torch.randn(8, 2)
    torch.testing.assert_close(net(x), _mlp()(x))


def _failing_backend(graph, example_inputs):
    raise RuntimeError("backend exploded")


def test_compile_error_at_first_call_falls_back_once_to_eager():
    net, eager = _mlp(), _mlp()
    assert compile_network(net, backend=_failing_backend)
    x = torch.randn(8, 2)
    with pytest.warns(CompileFallbackWarning, match="backend exploded") as record:
        first = net(x)
    assert len(record) == 1 and not is_compiled(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        flowed = flow(net, x, get_pairing("lr-kl"), 2, 1.0, 0.0)
    torch.testing.assert_close(first, eager(x))
    torch.testing.assert_close(flowed, flow(eager, x, get_pairing("lr-kl"), 2, 1.0, 0.0))


def test_model_errors_are_not_swallowed_by_the_fallback():
    net = _mlp()
    compile_network(net, backend="eager")  # dynamo tracing, no code generation
    with pytest.raises(ValueError, match=r"got \(4, 3\)"):
        net(torch.randn(4, 3))


@pytest.mark.timeout(600)
def test_compiled_step_gives_the_eager_loss():
    """Three training steps (flow with input gradients + update) compiled with inductor against
    eager from the same state. Stated tolerance: losses within 1e-5 relative (fp32 kernels that
    fuse differently), parameters within 1e-5."""
    losses, params = {}, {}
    for compiled in (False, True):
        state = make_state(_mlp(), lr=1e-3)
        if compiled:
            assert compile_network(state.module)
        gen = torch.Generator().manual_seed(0)
        data = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(1))
        losses[compiled] = [train_step(state, batch, make_simple_prior("gaussian", (2,)),
                                       get_pairing("lsif-chi2"), FlowSettings(3, 0, 1.0, 0.01), gen)["loss"]
                            for batch in data]
        params[compiled] = [p.detach().clone() for p in state.module.parameters()]
        assert is_compiled(state.module) == compiled  # no silent fallback
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
