"""Prior distributions q~_0 for the flow, and their fit from mergeable streaming statistics.

* ``uniform``: U[-1, 1] per dimension.
* ``gaussian``: N(0, I).
* ``full``: the data-dependent Gaussian N(mu, Sigma + 1e-4 I), sampled as one matmul mu + eps L^T.
* ``lowrank``: the same Gaussian in probabilistic-PCA form for large images (a full factor at
  128^2 is 9.7 GB): Sigma ~ U diag(lambda - s^2) U^T + s^2 I with the top-k eigenpairs and the
  mean residual variance s^2, sampled as mu + (eps_k * sqrt(lambda - s^2)) U^T + s * eps.

Fitting works from statistics that stream over the data and merge exactly across workers:
``Moments`` (count, sum x, sum x x^T in float64) for the full covariance, and ``Sketch``
(count, sum x, sum |x|^2, sum x (x^T Omega) for a fixed Gaussian test matrix Omega) for the
low-rank form when d x d does not fit in memory. Priors are stored as safetensors with JSON
metadata; nothing is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

JITTER = 1e-4  # added to the covariance diagonal, as in the reference implementation
KINDS = ("uniform", "gaussian", "full", "lowrank")


class Prior:
    """A distribution over tensors of shape ``shape``; ``sample`` takes an explicit generator."""

    kind: str

    def __init__(self, shape: Sequence[int], clamp: Optional[float] = None):
        self.shape = tuple(int(s) for s in shape)
        self.clamp = clamp  # samples are clamped to [-clamp, clamp] (images: 1.0)
        self.count = 0  # number of data points the prior was fitted on

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        flat = self._sample_flat(n, generator, torch.device(device))
        if self.clamp is not None:
            flat = flat.clamp(-self.clamp, self.clamp)
        return flat.reshape(n, *self.shape)

    def _sample_flat(self, n, generator, device) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    # A prior that streams data (translation's source domain) has a read position that a
    # checkpoint must keep, and gives grids and evaluations their own fixed stream; a distribution
    # has neither: its draws come from the caller's generator.
    position: Optional[dict] = None

    def for_samples(self, seed: int) -> "Prior":
        """The prior that grids and evaluations draw from, apart from training's draws."""
        return self

    def to(self, device) -> "Prior":
        for name, t in self.tensors().items():
            setattr(self, name, t.to(device))
        return self

    def save(self, path: str | Path) -> None:
        meta = {"kind": self.kind, "shape": json.dumps(self.shape),
                "count": str(self.count), "clamp": json.dumps(self.clamp)}
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors().items()}
        # safetensors refuses an empty dict of tensors; keep a marker for parameter-free priors.
        save_file(tensors or {"_empty": torch.zeros(0)}, str(path), metadata=meta)


def _randn(n, d, generator, device, dtype=torch.float32):
    return torch.randn(n, d, generator=generator, device=device, dtype=dtype)


class UniformPrior(Prior):
    kind = "uniform"

    def _sample_flat(self, n, generator, device):
        u = torch.rand(n, self.dim, generator=generator, device=device)
        return 2.0 * u - 1.0


class StandardGaussianPrior(Prior):
    kind = "gaussian"

    def _sample_flat(self, n, generator, device):
        return _randn(n, self.dim, generator, device)


class FullGaussianPrior(Prior):
    kind = "full"

    def __init__(self, shape, mean: torch.Tensor, scale_tril: torch.Tensor, clamp=None):
        super().__init__(shape, clamp)
        self.mean, self.scale_tril = mean.float(), scale_tril.float()

    def _sample_flat(self, n, generator, device):
        eps = _randn(n, self.dim, generator, self.mean.device)
        return torch.addmm(self.mean, eps, self.scale_tril.T).to(device)

    def tensors(self):
        return {"mean": self.mean, "scale_tril": self.scale_tril}


class LowRankGaussianPrior(Prior):
    kind = "lowrank"

    def __init__(self, shape, mean, components, scales, residual_std, clamp=None):
        super().__init__(shape, clamp)
        self.mean = mean.float()
        self.components = components.float()  # d x k, orthonormal columns
        self.scales = scales.float()  # k: sqrt(lambda_i - s^2)
        self.residual_std = residual_std.float().reshape(())  # s

    def _sample_flat(self, n, generator, device):
        dev = self.mean.device
        eps_k = _randn(n, self.components.shape[1], generator, dev)
        eps_d = _randn(n, self.dim, generator, dev)
        x = torch.addmm(self.mean, eps_k * self.scales, self.components.T)
        return (x + self.residual_std * eps_d).to(device)

    def tensors(self):
        return {"mean": self.mean, "components": self.components, "scales": self.scales,
                "residual_std": self.residual_std}


_CLASSES = {c.kind: c for c in (UniformPrior, StandardGaussianPrior, FullGaussianPrior,
                                LowRankGaussianPrior)}


def load_prior(path: str | Path) -> Prior:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prior file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("kind") not in _CLASSES:
        raise ValueError(f"{path} is not a prior file (metadata kind={meta.get('kind')!r})")
    tensors = {k: v for k, v in load_file(str(path)).items() if k != "_empty"}
    cls = _CLASSES[meta["kind"]]
    prior = cls(json.loads(meta["shape"]), **tensors, clamp=json.loads(meta["clamp"]))
    prior.count = int(meta.get("count", 0))
    return prior


def make_simple_prior(kind: str, shape: Sequence[int], clamp=None) -> Prior:
    if kind not in ("uniform", "gaussian"):
        raise ValueError(f"prior kind {kind!r} needs fitting; parameter-free kinds: uniform, gaussian")
    return _CLASSES[kind](shape, clamp)


def model_prior(kind: str, shape: Sequence[int], path: Optional[str | Path] = None) -> Prior:
    """The prior a model trains and samples with: its fitted file when it has one, else the
    parameter-free ``kind``, clamped to the image range as in training. Checked against ``shape``."""
    prior = load_prior(path) if path else make_simple_prior(kind, shape, clamp=1.0)
    check_prior_shape(prior, shape)
    return prior


def check_prior_shape(prior: Prior, shape: Sequence[int]) -> None:
    if tuple(prior.shape) != tuple(shape):
        raise ValueError(
            f"prior has shape {tuple(prior.shape)} but the data has shape {tuple(shape)}: "
            f"fit a prior on this dataset (datasets/fit_prior.py)"
        )


# ---------------------------------------------------------------- streaming statistics


@dataclass
class Moments:
    """count, sum x and sum x x^T in float64: exact to merge, enough for the full covariance."""

    count: int
    total: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def zeros(cls, dim: int) -> "Moments":
        return cls(0, torch.zeros(dim, dtype=torch.float64),
                   torch.zeros(dim, dim, dtype=torch.float64))

    def update(self, batch: torch.Tensor) -> "Moments":
        x = batch.reshape(batch.shape[0], -1).to(torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "Moments") -> "Moments":
        return Moments(self.count + other.count, self.total + other.total,
                       self.outer + other.outer)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise ValueError(f"need at least 2 samples to fit a covariance, got {self.count}")
        mean = self.total / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        return mean, cov


@dataclass
class Sketch:
    """Single-pass, mergeable sketch of the covariance for the low-rank prior.

    Keeps sum x (x^T Omega) for a Gaussian test matrix Omega (d x m) drawn from ``seed``, so every
    worker with the same seed builds the same Omega and partial sketches add up exactly. The
    covariance's top eigenpairs come from the Nystrom approximation C ~ Y (Omega^T Y)^+ Y^T with
    Y = C Omega (Tropp et al., 2017).
    """

    count: int
    total: torch.Tensor
    total_sq: float
    sketch: torch.Tensor  # d x m
    seed: int

    @staticmethod
    def test_matrix(dim: int, width: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(dim, width, generator=g, dtype=torch.float64)

    @classmethod
    def zeros(cls, dim: int, width: int, seed: int = 0) -> "Sketch":
        return cls(0, torch.zeros(dim, dtype=torch.float64), 0.0,
                   torch.zeros(dim, width, dtype=torch.float64), seed)

    def update(self, batch: torch.Tensor, omega: Optional[torch.Tensor] = None) -> "Sketch":
        x = batch.reshape(batch.shape[0], -1).to(torch.float64)
        if omega is None:
            omega = self.test_matrix(x.shape[1], self.sketch.shape[1], self.seed)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += float((x * x).sum())
        self.sketch += x.T @ (x @ omega)
        return self

    def merge(self, other: "Sketch") -> "Sketch":
        if other.seed != self.seed or other.sketch.shape != self.sketch.shape:
            raise ValueError("sketches with different seeds or widths cannot be merged")
        return Sketch(self.count + other.count, self.total + other.total,
                      self.total_sq + other.total_sq, self.sketch + other.sketch, self.seed)

    def top_eigen(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """mean, eigenvalues (rank), eigenvectors (d x rank), trace of the covariance."""
        n, (dim, width) = self.count, self.sketch.shape
        if rank > width:
            raise ValueError(f"rank {rank} exceeds the sketch width {width}")
        mean = self.total / n
        omega = self.test_matrix(dim, width, self.seed)
        y = self.sketch / n - torch.outer(mean, mean @ omega)  # C Omega
        # Stable Nystrom: shift by a tiny nu so the core matrix is positive definite.
        shift = 2.2e-16 * math.sqrt(dim) * torch.linalg.norm(y)
        y_shift = y + shift * omega
        core = omega.T @ y_shift
        chol = torch.linalg.cholesky((core + core.T) / 2)
        b = torch.linalg.solve_triangular(chol, y_shift.T, upper=False).T  # d x m
        u, s, _ = torch.linalg.svd(b, full_matrices=False)
        eigvals = (s**2 - shift).clamp_min(0.0)
        trace = self.total_sq / n - float(mean @ mean)
        return mean, eigvals[:rank], u[:, :rank], trace


def fit_full(moments: Moments, shape, clamp=None) -> FullGaussianPrior:
    mean, cov = moments.mean_cov()
    cov = cov + JITTER * torch.eye(cov.shape[0], dtype=cov.dtype)
    prior = FullGaussianPrior(shape, mean, torch.linalg.cholesky(cov), clamp)
    prior.count = moments.count
    return prior


def _ppca(mean, eigvals, eigvecs, trace, dim, shape, clamp, count) -> LowRankGaussianPrior:
    rank = eigvals.shape[0]
    residual_var = max((trace - float(eigvals.sum())) / max(dim - rank, 1), 0.0) + JITTER
    scales = (eigvals - residual_var).clamp_min(0.0).sqrt()
    prior = LowRankGaussianPrior(shape, mean, eigvecs, scales,
                                 torch.tensor(math.sqrt(residual_var)), clamp)
    prior.count = count
    return prior


def fit_lowrank(stats: Moments | Sketch, shape, rank: int, clamp=None) -> LowRankGaussianPrior:
    """Top-``rank`` eigenpairs plus isotropic residual, from exact moments or from a sketch."""
    dim = math.prod(shape)
    if isinstance(stats, Sketch):
        mean, eigvals, eigvecs, trace = stats.top_eigen(rank)
    else:
        mean, cov = stats.mean_cov()
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        eigvals, eigvecs = evals.flip(0)[:rank].clamp_min(0.0), evecs.flip(1)[:, :rank]
        trace = float(cov.diagonal().sum())
    return _ppca(mean, eigvals, eigvecs, trace, dim, shape, clamp, stats.count)
