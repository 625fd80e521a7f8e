"""The one sampler (fdrl.core.sampler) and every caller that goes through it.

A chunk's samples depend on (seed, chunk index, chunk size) only: computed alone, in any order
or by any worker they are the same. Each caller's output is the sampler's output, so the
callers inherit that (the Ray path is checked on 1 vs 2 workers in test_sampling.py).
"""

import dataclasses

import pytest
import torch

from fdrl.config import TrainConfig
from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.networks import build_network
from fdrl.core.priors import make_simple_prior
from fdrl.core.chunks import chunks
from fdrl.core.sampler import refinement_flow, sample, sample_chunk

FLOW = FlowSettings(flow_steps=3, extra_steps=2, eta=1.0, nu=0.05)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_network("mlp").eval().requires_grad_(False)
    return net, get_pairing("lr-kl"), make_simple_prior("gaussian", (2,))


def test_chunks_are_independent_of_order_and_of_each_other(model):
    net, pairing, prior = model
    whole = sample(net, pairing, FLOW, 10, seed=5, prior=prior, chunk=4, trace=True)
    # Each chunk on its own, last first, as separate workers would draw them.
    parts = {i: sample_chunk(net, pairing, FLOW, 5, i, size, prior=prior, trace=True)
             for i, _, size in reversed(chunks(10, 4))}
    torch.testing.assert_close(whole.x, torch.cat([parts[i].x for i in range(3)]), rtol=0, atol=0)
    weighted = sum(parts[i].log_r * size for i, _, size in chunks(10, 4)) / 10
    torch.testing.assert_close(whole.log_r, weighted)
    assert whole.log_r.shape == (FLOW.sampling_steps + 1,)
    assert not torch.equal(whole.x, sample(net, pairing, FLOW, 10, seed=6, prior=prior, chunk=4).x)


def test_recorded_stages_are_the_same_trajectories(model):
    net, pairing, prior = model
    k, total = FLOW.flow_steps, FLOW.sampling_steps
    run = sample(net, pairing, FLOW, 6, seed=1, prior=prior, record=(0, k, total))
    assert torch.equal(run.stages[total], run.x)
    # Stopping after K steps, or after none, gives the same points as the stages of the long run.
    assert torch.equal(sample(net, pairing, FLOW, 6, seed=1, prior=prior, steps=k).x, run.stages[k])
    assert torch.equal(sample(net, pairing, FLOW, 6, seed=1, prior=prior, steps=0).x, run.stages[0])
    assert not torch.equal(run.stages[0], run.stages[k])


def test_given_starting_points_replace_the_prior(model):
    net, pairing, _ = model
    start = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    a = sample(net, pairing, FLOW, seed=2, start=start, chunk=3)
    b = torch.cat([sample_chunk(net, pairing, FLOW, 2, i, size, start=start[s:s + size]).x
                   for i, s, size in chunks(7, 3)])
    assert torch.equal(a.x, b)
    noiseless = dataclasses.replace(FLOW, nu=0.0)
    assert torch.equal(sample(net, pairing, noiseless, seed=1, start=start).x,
                       sample(net, pairing, noiseless, seed=2, start=start).x)  # no noise: no seed


def test_extra_potential_enters_the_drift(model):
    net, pairing, prior = model
    pull = sample(net, pairing, FLOW, 64, seed=0, prior=prior,
                  extra_potential=lambda x, _out: -10.0 * x[:, 0]).x  # potential falls along +x0
    free = sample(net, pairing, FLOW, 64, seed=0, prior=prior).x
    shift = (pull - free)[:, 0]
    # Each step adds eta * 10 to x0 (the net's own drift differs a little at the moved points).
    assert shift.mean().item() == pytest.approx(FLOW.eta * 10 * FLOW.sampling_steps, rel=0.05)


def test_bad_arguments_are_named(model):
    net, pairing, prior = model
    with pytest.raises(ValueError, match="prior or starting points"):
        sample(net, pairing, FLOW, 4)
    with pytest.raises(ValueError, match="record steps"):
        sample(net, pairing, FLOW, 4, prior=prior, record=(99,))
    with pytest.raises(ValueError, match="2 starting points"):
        sample(net, pairing, FLOW, 4, start=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kappa"):
        FlowSettings(3, -1, 1.0, 0.0)


# ------------------------------------------------------------------------ each caller


def test_training_grid_is_the_samplers_output(model):
    from fdrl.distributed.train_worker import GRID_SEED_OFFSET, grid_samples

    net, pairing, prior = model
    cfg = TrainConfig(seed=3, grid_size=9)
    want = sample(net, pairing, FLOW, 9, seed=3 + GRID_SEED_OFFSET, prior=prior).x
    assert torch.equal(grid_samples(cfg, net, prior, pairing, FLOW), want)


def test_evaluation_stages_and_interpolation_are_the_samplers_output(model):
    from fdrl.eval.evaluation import flow_stages, interpolation

    net, pairing, prior = model
    loaded = type("Loaded", (), {"net": net, "pairing": pairing, "prior": prior})()
    staged = flow_stages(loaded, 10, seed=4, flow=FLOW)
    for name, steps in (("prior", 0), ("K", FLOW.flow_steps), ("K+kappa", FLOW.sampling_steps)):
        assert torch.equal(staged["samples"][name],
                           sample(net, pairing, FLOW, 10, seed=4, prior=prior, steps=steps).x)
    full = sample(net, pairing, FLOW, 10, seed=4, prior=prior, trace=True)
    assert staged["kl_curve"] == full.log_r.tolist()

    grid = interpolation(loaded, rows=3, cols=4, seed=0, flow=FLOW)
    assert grid.shape == (12, 2)
    # A row depends on its own index only, not on how many rows were asked for.
    more = interpolation(loaded, rows=5, cols=4, seed=0, flow=FLOW)
    torch.testing.assert_close(more[:12], grid)
    assert not torch.allclose(grid[:4], grid[4:8])


def test_refinement_is_the_flow_with_dgflow_noise(model):
    """DGflow's update with an FDRL ratio is the sampler's flow from the given points, with
    nu = sqrt(2 eta gamma); a chunk refined alone is the same as inside the whole run."""
    net, pairing, _ = model
    assert refinement_flow(4, 0.5, 0.01) == FlowSettings(4, 0, 0.5, (2 * 0.5 * 0.01) ** 0.5)
    start = torch.randn(70, 2, generator=torch.Generator().manual_seed(1))
    refined = sample(net, pairing, refinement_flow(4, 0.5, 0.01), seed=9, start=start, trace=True)
    alone = sample_chunk(net, pairing, refinement_flow(4, 0.5, 0.01), 9, 1, 6, start=start[64:])
    assert torch.equal(alone.x, refined.x[64:]) and len(refined.log_r) == 5
    with pytest.raises(ValueError, match="gamma"):
        refinement_flow(4, 0.5, -1.0)
