"""Sample-quality metrics on any feature space: Fréchet distance, KID, precision/recall.

Feature statistics stream and merge through :class:`fdrl.core.priors.Moments` (count, sum x,
sum x x^T in float64), so a Fréchet distance can be computed from many workers' partial
statistics. ``domain_features`` runs any feature network (e.g. the digit classifier of
:mod:`fdrl.eval.classifier`) over a batch iterator; the standard FID's Inception features are
:mod:`fdrl.eval.inception`'s.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch

from fdrl.core.priors import Moments

# ----------------------------------------------------------------------------- Fréchet distance


def _f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of sqrt(eigenvalues) of the *symmetric* PSD matrix
    S1^(1/2) S2 S1^(1/2), which is similar to S1 S2 and so has the same eigenvalues. Two
    symmetric eigendecompositions (``eigh``) give real eigenvalues by construction; rounding can
    only produce tiny negative ones, which are clamped to 0. This is chosen over
    ``scipy.linalg.sqrtm(S1 @ S2)``: that works on a non-symmetric product, returns complex
    results with spurious imaginary parts, and when the product is near-singular (fewer samples
    than dimensions, dead features) it is inaccurate or fails, and the usual fix (adding
    eps * I to both covariances and retrying) changes the answer by about eps * trace. The
    eigen route needs no fallback and stays finite for singular covariances.
    Cost: two d x d ``eigh`` (d = 2048: a few seconds on a CPU).
    """
    mu1, mu2 = _f64(mu1).reshape(-1), _f64(mu2).reshape(-1)
    s1, s2 = _f64(sigma1), _f64(sigma2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("non-finite values in the Gaussian statistics")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # The true value is >= 0; identical statistics can give -1e-12 from rounding.
    return max(fd, 0.0)


def gaussian_stats(moments: Moments, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) as float64 numpy from streamed ``Moments``.

    ``ddof=1`` (the default) gives the sample covariance of ``np.cov``, which is what the
    standard FID implementations use; ``Moments.mean_cov`` itself returns the ``ddof=0`` form.
    The covariance comes from E[x x^T] - mu mu^T in float64: accurate as long as the features'
    means are not many orders of magnitude larger than their spreads (true of network features).
    """
    mean, cov = moments.mean_cov()
    n = moments.count
    if n - ddof < 1:
        raise ValueError(f"need more than {ddof} samples, got {n}")
    return mean.numpy(), cov.numpy() * (n / (n - ddof))


def frechet_distance_from_moments(a: Moments, b: Moments) -> float:
    """Fréchet distance between the Gaussians fitted to two streamed feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def feature_moments(batches: Iterable) -> Moments:
    """``Moments`` of feature batches (N x D tensors or arrays), accumulated one batch at a time."""
    moments: Optional[Moments] = None
    for batch in batches:
        x = torch.as_tensor(batch).reshape(len(batch), -1)
        if moments is None:
            moments = Moments.zeros(x.shape[1])
        moments.update(x)
    if moments is None:
        raise ValueError("no feature batches")
    return moments


# -------------------------------------------------------------------------------------- KID


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimator of MMD^2 with the
    cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over ``subsets`` random subsets
    of ``subset_size`` rows of each set (drawn without replacement). Returns (mean, std) over the
    subsets. ``subset_size`` is reduced to the smaller set's size when that is smaller.

    Unbiased means that E[estimate] = MMD^2 exactly, so for two samples of one distribution the
    mean is ~0 and can be slightly negative.
    """
    a, b = _f64(features_a), _f64(features_b)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = within - 2.0 * kxy.sum() / (m * m)
    return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------- precision / recall


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row of x."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(out)


def _covered(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
             chunk: int) -> torch.Tensor:
    """For each query row: does it fall inside any support row's k-NN ball?"""
    out = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], support)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    precision: share of fake samples inside the real manifold (the union of balls around each
    real feature with radius = distance to its k-th nearest real neighbour); recall: share of
    real samples inside the fake manifold. float64, O(n^2) distances computed in chunks.
    """
    r = torch.as_tensor(_f64(real)).reshape(len(real), -1)
    f = torch.as_tensor(_f64(fake)).reshape(len(fake), -1)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _covered(f, r, _kth_neighbour_radii(r, k, chunk), chunk).double().mean()
    recall = _covered(r, f, _kth_neighbour_radii(f, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------- features of any network


@torch.no_grad()
def domain_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable,
                    *, max_samples: Optional[int] = None, keep: bool = True,
                    device: Optional[torch.device | str] = None,
                    ) -> tuple[Moments, Optional[torch.Tensor]]:
    """Run ``feature_fn`` (e.g. ``classifier.features``; put its module in eval mode) over image
    batches. Returns the streamed ``Moments`` of the features (for the Fréchet distance) and,
    when ``keep``, the raw features as one float32 (N, D) CPU tensor (for KID and
    precision/recall; ``None`` otherwise). Stops after ``max_samples`` samples if given.
    """
    moments: Optional[Moments] = None
    kept: list[torch.Tensor] = []
    seen = 0
    for batch in batches:
        if max_samples is not None:
            if seen >= max_samples:
                break
            batch = batch[:max_samples - seen]
        x = torch.as_tensor(batch)
        if device is not None:
            x = x.to(device)
        feats = feature_fn(x).reshape(len(x), -1).detach().cpu()
        if moments is None:
            moments = Moments.zeros(feats.shape[1])
        moments.update(feats)
        if keep:
            kept.append(feats.float())
        seen += len(x)
    if moments is None:
        raise ValueError("no batches to compute features on")
    return moments, (torch.cat(kept) if keep else None)


def feature_metrics(feature_fn: Callable[[torch.Tensor], torch.Tensor], samples: Iterable,
                    reference: Iterable, *, max_samples: Optional[int] = None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, prc: bool = True,
                    k: int = 3, seed: int = 0, device=None) -> dict[str, float]:
    """Fréchet distance, KID and (optionally) precision/recall between generated ``samples``
    and ``reference`` image batches, in the feature space of ``feature_fn`` (a domain metric,
    e.g. the MNIST classifier's penultimate layer; not comparable to standard FID)."""
    ms, fs = domain_features(feature_fn, samples, max_samples=max_samples, device=device)
    mr, fr = domain_features(feature_fn, reference, max_samples=max_samples, device=device)
    kid_mean, kid_std = kid(fs, fr, kid_subsets, kid_subset_size, seed)
    out = {"fd": frechet_distance_from_moments(ms, mr), "kid_mean": kid_mean, "kid_std": kid_std,
           "n_samples": float(ms.count), "n_reference": float(mr.count)}
    if prc:
        out["precision"], out["recall"] = precision_recall(fr, fs, k=k)
    return out
