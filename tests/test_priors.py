import math

import pytest
import torch

from fdrl.core.priors import (FullGaussianPrior, Moments, Sketch, check_prior_shape, fit_full,
                         fit_lowrank, load_prior, make_simple_prior)


def _gaussian_data(n, dim, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, rank or dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    mean = torch.linspace(-0.5, 0.5, dim, dtype=torch.float64)
    x = mean + torch.randn(n, mix.shape[1], generator=g, dtype=torch.float64) @ mix.T
    return x, mean, mix @ mix.T


def test_streamed_and_merged_moments_equal_whole():
    x, _, _ = _gaussian_data(3000, 12)
    whole = Moments.zeros(12).update(x)
    parts = [Moments.zeros(12).update(chunk) for chunk in x.split(700)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert merged.count == whole.count == 3000
    torch.testing.assert_close(merged.total, whole.total, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(merged.outer, whole.outer, rtol=1e-12, atol=1e-10)


def test_sketches_merge_exactly():
    x, _, _ = _gaussian_data(1000, 20, rank=4)
    whole = Sketch.zeros(20, 8, seed=5).update(x)
    a, b = Sketch.zeros(20, 8, seed=5).update(x[:400]), Sketch.zeros(20, 8, seed=5).update(x[400:])
    merged = a.merge(b)
    torch.testing.assert_close(merged.sketch, whole.sketch, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="different seeds"):
        a.merge(Sketch.zeros(20, 8, seed=6))


def test_full_prior_fits_mean_and_covariance():
    x, mean, cov = _gaussian_data(50_000, 6)
    prior = fit_full(Moments.zeros(6).update(x), shape=(6,))
    torch.testing.assert_close(prior.mean.double(), mean, atol=0.02, rtol=0)
    fitted_cov = prior.scale_tril.double() @ prior.scale_tril.double().T
    torch.testing.assert_close(fitted_cov, cov + 1e-4 * torch.eye(6, dtype=torch.float64),
                               atol=0.02, rtol=0)
    samples = prior.sample(50_000, torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(torch.cov(samples.T), cov, atol=0.03, rtol=0)
    assert prior.count == 50_000


def test_full_prior_samples_are_one_matmul():
    x, _, _ = _gaussian_data(500, 5)
    prior = fit_full(Moments.zeros(5).update(x), shape=(5,))
    got = prior.sample(7, torch.Generator().manual_seed(2))
    eps = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, prior.mean + eps @ prior.scale_tril.T)


def test_lowrank_from_sketch_matches_exact_eigendecomposition():
    x, _, cov = _gaussian_data(20_000, 40, rank=5)
    exact = fit_lowrank(Moments.zeros(40).update(x), shape=(40,), rank=5)
    sketched = fit_lowrank(Sketch.zeros(40, 15, seed=0).update(x), shape=(40,), rank=5)
    torch.testing.assert_close(sketched.scales, exact.scales, rtol=1e-4, atol=1e-6)
    # Same subspace: the projections onto the top components agree.
    proj_exact = exact.components @ exact.components.T
    proj_sketch = sketched.components @ sketched.components.T
    torch.testing.assert_close(proj_sketch, proj_exact, atol=1e-3, rtol=0)
    samples = sketched.sample(40_000, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(torch.cov(samples.T), cov, atol=0.02, rtol=0)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "full", "lowrank"])
def test_save_load_round_trip(tmp_path, kind):
    shape = (1, 4, 4)
    x, _, _ = _gaussian_data(300, 16)
    if kind == "full":
        prior = fit_full(Moments.zeros(16).update(x), shape, clamp=1.0)
    elif kind == "lowrank":
        prior = fit_lowrank(Moments.zeros(16).update(x), shape, rank=3, clamp=1.0)
    else:
        prior = make_simple_prior(kind, shape, clamp=1.0)
    prior.save(tmp_path / "prior.safetensors")
    loaded = load_prior(tmp_path / "prior.safetensors")
    assert (loaded.kind, loaded.shape, loaded.count, loaded.clamp) == (kind, shape, prior.count, 1.0)
    a = prior.sample(10, torch.Generator().manual_seed(0))
    b = loaded.sample(10, torch.Generator().manual_seed(0))
    assert a.shape == (10, 1, 4, 4) and a.abs().max() <= 1.0
    torch.testing.assert_close(a, b)


def test_wrong_resolution_and_bad_files(tmp_path):
    prior = make_simple_prior("uniform", (3, 32, 32))
    with pytest.raises(ValueError, match=r"prior has shape \(3, 32, 32\) but the data has shape \(3, 64, 64\)"):
        check_prior_shape(prior, (3, 64, 64))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_prior(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a prior file"):
        load_prior(tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="needs fitting"):
        make_simple_prior("full", (2,))
    assert isinstance(fit_full(Moments.zeros(2).update(torch.randn(10, 2)), (2,)), FullGaussianPrior)
