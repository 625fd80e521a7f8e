"""Sample-quality metrics: Fréchet distance, KID, precision/recall, and standard FID/IS/KID.

Two families:

* Metrics on any feature space, with no external weights (``frechet_distance``, ``kid``,
  ``precision_recall``, ``feature_metrics``). Feature statistics stream and merge through
  :class:`fdrl.priors.Moments` (count, sum x, sum x x^T in float64), so a Fréchet distance can be
  computed from many workers' partial statistics. ``domain_features`` runs any feature network
  (e.g. the MNIST classifier of :mod:`fdrl.classifier`) over a batch iterator.
* ``standard_metrics``: the standard FID, Inception Score and KID through torch-fidelity with
  the TF-Inception weights file supplied by path (nothing is downloaded). Generated samples are
  streamed to it as a ``Dataset`` (no PNGs), and the reference features are cached once per
  dataset, keyed by the shard manifest's hash.

No Ray and no MLflow here. torch-fidelity is imported only inside ``standard_metrics`` (optional
extra ``fid``); it imports torchvision, which does not import on CPU-only torch builds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

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


def shard_batches(root: str | os.PathLike, batch_size: int = 256,
                  limit: Optional[int] = None) -> Iterator[torch.Tensor]:
    """A shard set's images in manifest order as float batches (N, C, H, W) in [-1, 1].

    Unreadable samples are skipped (and logged) as in training."""
    from fdrl.data.stream import StreamStats, iter_samples
    from fdrl.data.manifest import open_shard_set

    buf: list[torch.Tensor] = []
    emitted = 0
    for _, _, image in iter_samples(open_shard_set(root), StreamStats()):
        buf.append(image)
        if limit is not None and emitted + len(buf) >= limit:
            yield torch.stack(buf[:limit - emitted])
            return
        if len(buf) == batch_size:
            yield torch.stack(buf)
            emitted += len(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


# --------------------------------------------------------- standard FID / IS / KID (torch-fidelity)

FID_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_ENV = "FDRL_FID_WEIGHTS"
FID_WEIGHTS_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + FID_WEIGHTS_NAME,
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
)
# Characteristic tensors of torch-fidelity's FeatureExtractorInceptionV3 state dict (the same key
# names and shapes as pytorch-fid's FID Inception): the stem conv, its batch norm, the last
# Inception block's pool branch and the 1008-way logits layer of the 2015 TF graph.
INCEPTION_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _default_weights_path() -> Path:
    # Where torch-fidelity's own download would have put the file ($TORCH_HOME/hub/checkpoints).
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def _how_to_get_weights(tried: Sequence[str]) -> str:
    urls = "\n".join(f"    {u}" for u in FID_WEIGHTS_URLS)
    return (
        f"standard FID/IS/KID need the Inception weights file {FID_WEIGHTS_NAME} "
        f"(nothing is downloaded at run time); tried: {', '.join(tried)}.\n"
        f"Download it on a machine with internet from torch-fidelity's or pytorch-fid's GitHub "
        f"release assets (same tensors; pytorch-fid names it pt_inception-2015-12-05-6726825d.pth):"
        f"\n{urls}\ncopy it here, then pass --fid-weights PATH (weights_path=PATH) or set "
        f"{FID_WEIGHTS_ENV}=PATH."
    )


def resolve_fid_weights(weights_path: Optional[str | os.PathLike] = None) -> Path:
    """The Inception weights file: ``weights_path``, else $FDRL_FID_WEIGHTS, else the torch hub
    checkpoint folder. Raises FileNotFoundError (naming the file, the path tried and how to get
    it) when missing and ValueError when the file is not the expected Inception state dict."""
    if weights_path is not None:
        path, source = Path(weights_path).expanduser(), "weights_path"
    elif os.environ.get(FID_WEIGHTS_ENV):
        path, source = Path(os.environ[FID_WEIGHTS_ENV]).expanduser(), f"${FID_WEIGHTS_ENV}"
    else:
        path, source = _default_weights_path(), "the torch hub checkpoint folder"
    if not path.is_file():
        raise FileNotFoundError(_how_to_get_weights([f"{path} ({source})"]))
    check_inception_weights(path)
    return path


def check_inception_weights(path: str | os.PathLike) -> None:
    """Raise ValueError unless ``path`` is a safely loadable state dict with the Inception keys.

    This is also a safety gate: torch-fidelity 0.4.0 itself loads the file with
    ``torch.load(weights_only=False)`` (full unpickling). A file that loads under the restricted
    ``weights_only=True`` unpickler references no other globals, so the later full load of the
    same bytes runs nothing else either."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} is not a loadable PyTorch weights file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected {FID_WEIGHTS_NAME}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; expected {FID_WEIGHTS_NAME}")
    problems = []
    for key, shape in INCEPTION_KEYS.items():
        if key not in state:
            problems.append(f"missing {key}")
        elif tuple(state[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {shape}")
    if problems:
        raise ValueError(f"{path} is not the FID Inception state dict ({FID_WEIGHTS_NAME}): "
                         + "; ".join(problems))


def _to_uint8_rgb(batch) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] (or uint8) -> uint8 (N, 3, H, W); grey is repeated to RGB."""
    x = torch.as_tensor(batch).detach().cpu()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected image batches of shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


class StreamedImages(Dataset):
    """A map-style ``Dataset`` over an iterable of image batches, read once and in order.

    torch-fidelity reads ``dataset[0]`` (a type check) and then indices 0..N-1 in order through
    a single-process DataLoader; this class keeps one batch in memory, so generated samples go
    straight from the sampler to the Inception network, never to disk. The batch iterable is
    started lazily on first access (a reference whose features are cached is never read).
    Items are uint8 (3, H, W) tensors. Random access fails with a clear error.
    """

    def __init__(self, batches: Iterable, length: int):
        if length < 1:
            raise ValueError(f"need at least one sample, got length {length}")
        self._batches, self._length = batches, int(length)
        self._it: Optional[Iterator] = None
        self._buf = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        self._start = 0

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        if self._it is None:
            self._it = iter(self._batches)
        if index < self._start:
            raise RuntimeError(f"streamed samples are read once and in order: index {index} was "
                               f"already passed (the buffer starts at {self._start})")
        while index >= self._start + len(self._buf):
            self._start += len(self._buf)
            try:
                self._buf = _to_uint8_rgb(next(self._it))
            except StopIteration:
                raise ValueError(f"the sample batches ended after {self._start} samples, "
                                 f"but {self._length} were announced") from None
        return self._buf[index - self._start]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("FDRL_HOME") or os.getcwd()).expanduser().resolve() / "fid_cache"


def reference_cache_name(reference_dir: str | os.PathLike, limit: Optional[int] = None) -> str:
    """The torch-fidelity cache entry of a shard set: its manifest hash (+ the sample limit)."""
    from fdrl.data.manifest import manifest_hash

    name = f"fdrl-{manifest_hash(reference_dir)}"
    return name if limit is None else f"{name}-first{limit}"


def standard_metrics(samples: Iterable, reference_dir: str | os.PathLike,
                     weights_path: Optional[str | os.PathLike] = None,
                     cache_dir: Optional[str | os.PathLike] = None, *,
                     num_samples: Optional[int] = None, reference_limit: Optional[int] = None,
                     isc: bool = True, fid: bool = True, kid: bool = True,
                     kid_subsets: int = 100, kid_subset_size: int = 1000,
                     batch_size: int = 64, cuda: Optional[bool] = None,
                     verbose: bool = False) -> dict[str, float]:
    """Standard FID, Inception Score and KID (torch-fidelity, TF-Inception 2015 weights).

    ``samples``: an iterable of image batches (N, C, H, W), float in [-1, 1] or uint8, C = 1 or 3,
    streamed once (a generator is fine; give ``num_samples`` when it has no ``len`` counting
    samples). ``reference_dir``: a shard directory (manifest.parquet); its features are computed
    once and cached under ``cache_dir`` (default ``$FDRL_HOME/fid_cache`` or ``./fid_cache``),
    keyed by the manifest hash. ``weights_path`` (or $FDRL_FID_WEIGHTS) names
    ``weights-inception-2015-12-05-6726825d.pth``; it is checked before torch-fidelity is
    imported. KID's subset size is capped at the smaller sample count.

    Returns the requested subset of {"fid", "is_mean", "is_std", "kid_mean", "kid_std"} plus
    "num_samples" and "num_reference".
    """
    weights = resolve_fid_weights(weights_path)
    from fdrl.data.manifest import open_shard_set

    shard_set = open_shard_set(reference_dir)  # FileNotFoundError for a missing manifest
    n_ref = shard_set.total if reference_limit is None else min(reference_limit, shard_set.total)
    if num_samples is None:
        try:
            num_samples = sum(len(b) for b in samples) if isinstance(samples, (list, tuple)) \
                else len(samples)  # a tensor of images counts its first dimension
        except TypeError:
            raise ValueError("samples has no length: pass num_samples=N for a generator") from None
    if not (isc or fid or kid):
        raise ValueError("nothing to compute: isc, fid and kid are all False")
    try:
        import torch_fidelity
    except Exception as err:  # ImportError, or torchvision's RuntimeError on CPU-only torch
        raise ImportError(
            "standard metrics need torch-fidelity (pip install 'fdrl-platform[fid]') and a "
            f"working torchvision, which does not import on CPU-only torch builds: "
            f"{type(err).__name__}: {err}") from err

    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if isinstance(samples, torch.Tensor):
        samples = torch.split(samples, batch_size)
    generated = StreamedImages(samples, num_samples)
    reference = StreamedImages(shard_batches(reference_dir, batch_size, limit=n_ref), n_ref)
    result = torch_fidelity.calculate_metrics(
        input1=generated, input2=reference if (fid or kid) else None,
        isc=isc, fid=fid, kid=kid,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights),
        cache_root=str(cache), cache=True,
        input2_cache_name=reference_cache_name(reference_dir, reference_limit),
        kid_subsets=kid_subsets,
        kid_subset_size=min(kid_subset_size, num_samples, n_ref),
        batch_size=batch_size, cuda=torch.cuda.is_available() if cuda is None else cuda,
        save_cpu_ram=True,  # one process: the streamed samples cannot be split across workers
        verbose=verbose,
    )
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "is_mean",
             "inception_score_std": "is_std", "kernel_inception_distance_mean": "kid_mean",
             "kernel_inception_distance_std": "kid_std"}
    out = {names[k]: float(v) for k, v in result.items() if k in names}
    out["num_samples"], out["num_reference"] = float(num_samples), float(n_ref)
    return out
