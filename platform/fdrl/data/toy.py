"""2D toy data and metrics (DGflow's recipes, see REFERENCE.md).

25Gaussians: 25 isotropic Gaussians at {-4,-2,0,2,4}^2 with sigma 0.05, all divided by 2*sqrt(2).
2DSwissroll: sklearn make_swiss_roll(noise=0.25), dims (0, 2), divided by 7.5.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.datasets import make_swiss_roll
from sklearn.neighbors import KernelDensity

GRID_SCALE = 2 * math.sqrt(2)
MODE_STD = 0.05 / GRID_SCALE  # sigma in data units
MODES = np.array([(x, y) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)],
                 dtype=np.float64) / GRID_SCALE
DATASETS = ("25gaussians", "swissroll")


def make_toy(name: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "25gaussians":
        centres = MODES[rng.integers(0, len(MODES), size=n)]
        return (centres + MODE_STD * rng.standard_normal((n, 2))).astype(np.float32)
    if name == "swissroll":
        x, _ = make_swiss_roll(n, noise=0.25, random_state=int(rng.integers(2**31)))
        return (x[:, [0, 2]] / 7.5).astype(np.float32)
    raise ValueError(f"unknown toy dataset {name!r}; valid: {', '.join(DATASETS)}")


def kde_score(samples: np.ndarray, real: np.ndarray, bandwidth: float = 0.1) -> float:
    """Mean log-likelihood of real points under a Gaussian KDE fitted on generated samples."""
    kde = KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(samples)
    return float(kde.score_samples(real).mean())


def mode_metrics(samples: np.ndarray, min_share: float = 0.01) -> dict[str, float]:
    """% high quality: share within 4 sigma of the nearest mode; modes covered: modes that get at
    least ``min_share`` of all samples as high-quality samples."""
    dist = np.linalg.norm(samples[:, None, :] - MODES[None], axis=-1)
    nearest, nearest_dist = dist.argmin(1), dist.min(1)
    good = nearest_dist <= 4 * MODE_STD
    counts = np.bincount(nearest[good], minlength=len(MODES))
    return {
        "pct_high_quality": float(100.0 * good.mean()),
        "modes_covered": int((counts >= min_share * len(samples)).sum()),
    }


def toy_metrics(name: str, samples: np.ndarray, real: np.ndarray) -> dict[str, float]:
    metrics = {"kde_score": kde_score(samples, real)}
    if name == "25gaussians":
        metrics.update(mode_metrics(samples))
    return metrics
