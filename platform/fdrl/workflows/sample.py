"""What ``jobs/sample.py`` does: draw samples of a registered FDRL model on Ray actors.

The sampler's chunks (``fdrl.core.chunks``) are spread over actors that each hold one copy of the
model (``fdrl.distributed.fanout``; a GPU each when the cluster has GPUs). Each chunk is seeded
from (seed, index) alone, so 1 worker and 8 workers give the same array. Samples are clamped to
the image range [-1, 1]. The same actors draw class-guided rows (a registered classifier and
labels, ``fdrl.core.guidance``) and flow given starting points (translation).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from fdrl.core.chunks import CHUNK, chunks
from fdrl.core.flow import FlowSettings
from fdrl.core.guidance import check_classifier_fits
from fdrl.core.sampler import ChunkSampler, draw_chunk, sample
from fdrl.data import storage
from fdrl.data.images import save_grid
from fdrl.distributed.fanout import ActorPool

GRID_COLUMNS = 10
SAMPLING_EXPERIMENT = "fdrl-sampling"


def sample_distributed(model, n: int, seed: int, workers: int, chunk: int = CHUNK,
                       flow: Optional[FlowSettings] = None, progress: bool = True, *,
                       classifier=None, phi: float = 0.0, labels: Optional[list[int]] = None,
                       start: Optional[np.ndarray] = None) -> np.ndarray:
    """N x C x H x W float32 samples from ``model`` (a ``registry.LoadedModel``) on ``workers``
    Ray actors.

    With a ``classifier`` and ``labels``: an array (len(labels), N, C, H, W), row i guided towards
    ``labels[i]`` with weight ``phi``. Every row uses the same chunk seeds, so rows start from the
    same prior draws and differ by the guidance only. With ``start`` (N x C x H x W): those points
    are flowed instead of prior draws."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    flow = flow or FlowSettings.from_config(model.config)
    if start is not None and len(start) != n:
        raise ValueError(f"n={n} but {len(start)} starting points were given")
    if start is None and model.prior is None:
        raise ValueError(f"model {model.name} has no prior to sample from (a translation model): "
                         f"give the source images to flow (--input)")
    if labels is not None and classifier is None:
        raise ValueError("class labels need a classifier to guide the flow")
    rows = [None] if labels is None else list(labels)
    todo = [(row, c) for row in range(len(rows)) for c in chunks(n, chunk)]
    items = [(seed, c.index, c.size, rows[row],
              None if start is None else torch.from_numpy(np.ascontiguousarray(start[c.start:c.start + c.size], np.float32)))
             for row, c in todo]
    out = np.empty((len(rows), n, *model.net.in_shape), np.float32)
    with ActorPool(min(workers, len(items)), ChunkSampler, model.net, model.prior, model.pairing,
                   flow, classifier, phi) as pool:
        for i, x in pool.map(draw_chunk, items, sizes=[c.size for _, c in todo], desc="sampling",
                             progress=progress):
            row, c = todo[i]
            out[row, c.start:c.start + c.size] = x.clamp(-1, 1).numpy()
    return out if labels is not None else out[0]


def save_samples(samples: np.ndarray, out_dir: str | Path, grid: int = 64) -> tuple[Path, Path]:
    """``out_dir/samples.npy`` (all samples) and ``out_dir/grid.png`` (the first ``grid``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", samples)
    grid_path = save_grid(torch.from_numpy(samples[:grid]), out / "grid.png")
    return out / "samples.npy", grid_path


def sample_to_dir(model_uri: str, n: int, out_dir: str | Path, seed: int = 0, workers: int = 1,
                  chunk: int = CHUNK, tracking_uri: Optional[str] = None,
                  progress: bool = True, **flow_overrides) -> dict:
    """Load a registered model (hash-checked, no unpickling), sample on Ray, write samples.npy and
    grid.png. Returns a summary (paths, timing, settings)."""
    from fdrl.distributed.cluster import connect
    from fdrl.tracking.registry import load_fdrl_model

    model = load_fdrl_model(model_uri, tracking_uri=tracking_uri)
    flow = FlowSettings.from_config(model.config, **flow_overrides)
    connect()  # before the clock: the rate counts actor start-up, not the cluster's
    start = time.perf_counter()
    samples = sample_distributed(model, n, seed, workers, chunk, flow, progress)
    seconds = time.perf_counter() - start
    with storage.staged_dir(out_dir) as local:
        save_samples(samples, local)
    return {"model": f"models:/{model.name}/{model.version}", "run_id": model.run_id,
            "samples": storage.join(str(out_dir), "samples.npy"),
            "grid": storage.join(str(out_dir), "grid.png"), "n": n, "seed": seed, "workers": workers,
            "chunk": chunk, "flow": asdict(flow), "seconds": seconds,
            "images_per_s": n / seconds}


def load_samples(spec: str, n: Optional[int], seed: int, tracking_uri: Optional[str]) -> np.ndarray:
    """Samples to refine or translate: a .npy file (N x C x H x W in [-1, 1]) or
    models:/NAME@ALIAS of a registered FDRL generator, sampled here with its own flow."""
    if spec.startswith("models:/"):
        from fdrl.tracking.registry import load_fdrl_model

        source = load_fdrl_model(spec, tracking_uri)
        drawn = sample(source.net, source.pairing, source.flow, n or 256, seed, prior=source.prior)
        return drawn.x.clamp(-1, 1).numpy()
    if not storage.is_file(spec):
        raise FileNotFoundError(f"input samples not found: {spec} (a .npy file or models:/NAME@ALIAS)")
    array = load_npy(spec)
    return array[:n] if n else array


def load_npy(path: str) -> np.ndarray:
    """A .npy file, local or in object storage; never unpickled."""
    return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)


# ---------------------------------------------------------------- class-conditional, translation


def parse_labels(text: str, num_classes: int) -> list[int]:
    """``all`` -> every class; else comma-separated class indices, checked against the classifier."""
    if text.strip() == "all":
        return list(range(num_classes))
    try:
        labels = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--label must be 'all' or class indices like 3 or 1,7; got {text!r}") from None
    bad = [n for n in labels if not 0 <= n < num_classes]
    if bad:
        raise ValueError(f"label(s) {bad} outside the classifier's classes 0..{num_classes - 1}")
    return labels


def _log_run(tracking_uri, params: dict, files: Sequence[Path], tags: dict) -> Optional[str]:
    from fdrl.tracking.tracker import Tracker

    with Tracker(SAMPLING_EXPERIMENT, run_name=params.get("kind"), tracking_uri=tracking_uri) as tracker:
        tracker.log_params(params)
        tracker.set_tags(tags)
        for f in files:
            tracker.log_artifact(f)
    return tracker.run_id


def conditional_to_dir(model_uri: str, classifier_uri: str, label: str, n: int,
                       out_dir: str | Path, phi: float = 0.5, seed: int = 0, workers: int = 1,
                       chunk: int = CHUNK, tracking_uri: Optional[str] = None,
                       progress: bool = True, log: bool = True, **flow_overrides) -> dict:
    """Class-conditional samples: ``n`` per label, in ``out_dir``: samples.npy
    (labels x n x C x H x W, or n x C x H x W for one label), labels.npy and grid.png (one row per
    label). The run is logged to MLflow (experiment fdrl-sampling) with the grid."""
    from fdrl.tracking.classifiers import open_classifier
    from fdrl.tracking.registry import load_fdrl_model

    if not phi >= 0:
        raise ValueError(f"guidance weight phi must be >= 0, got {phi!r}")
    model = load_fdrl_model(model_uri, tracking_uri=tracking_uri)
    classifier = open_classifier(classifier_uri, tracking_uri)
    num_classes = classifier.config.num_classes
    labels = parse_labels(label, num_classes)
    check_classifier_fits(classifier, model.net.in_shape, num_classes, labels)
    flow = FlowSettings.from_config(model.config, **flow_overrides)
    start = time.perf_counter()
    rows = sample_distributed(model, n, seed, workers, chunk, flow, progress,
                              classifier=classifier, phi=phi, labels=labels)
    seconds = time.perf_counter() - start
    summary = {"kind": "conditional", "model": f"models:/{model.name}/{model.version}",
               "classifier": classifier_uri, "labels": labels, "phi": phi, "n_per_label": n,
               "seed": seed, "workers": workers, "chunk": chunk, "flow": asdict(flow),
               "seconds": seconds, "images_per_s": n * len(labels) / seconds,
               "samples": storage.join(str(out_dir), "samples.npy"),
               "grid": storage.join(str(out_dir), "grid.png")}
    with storage.staged_dir(out_dir) as out:
        np.save(out / "samples.npy", rows if len(labels) > 1 else rows[0])
        np.save(out / "labels.npy", np.repeat(np.asarray(labels, np.int64), n))
        cols = min(n, GRID_COLUMNS)
        grid = save_grid(torch.from_numpy(rows[:, :cols].reshape(-1, *rows.shape[2:])),
                         out / "grid.png", nrow=cols)
        if log:
            summary["mlflow_run_id"] = _log_run(
                tracking_uri, {k: summary[k] for k in ("kind", "model", "classifier", "phi",
                                                       "n_per_label", "seed", "chunk", "flow")}
                | {"labels": label}, [grid], {"fdrl.model_run_id": model.run_id})
    return summary


def load_source(spec: str | Path, shape: Sequence[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Source images to translate, in their order: a .npy (N x C x H x W in [-1, 1]) or a shard
    folder (manifest order; its .cls labels too, when every sample has one). Refuses images
    whose shape is not the model's."""
    spec = str(spec)
    labels = None
    if storage.is_dir(spec):
        from fdrl.data.manifest import open_shard_set
        from fdrl.data.stream import StreamStats, iter_samples

        found, classes = [], []
        for _, members, image in iter_samples(open_shard_set(spec), StreamStats()):
            found.append(image)
            classes.append(members.get("cls"))
        if not found:
            raise ValueError(f"no readable images in {spec}")
        images = torch.stack(found).numpy()
        if all(c is not None for c in classes):
            labels = np.asarray([int(c.decode().strip()) for c in classes], np.int64)
    elif spec.endswith(".npy") and storage.is_file(spec):
        images = load_npy(spec).astype(np.float32, copy=False)
    else:
        raise FileNotFoundError(f"translation input not found: {spec} (a shard folder or a .npy file)")
    if tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"source images have shape {tuple(images.shape[1:])} but the model's "
                         f"target images have shape {tuple(shape)}: prepare the source at the "
                         f"target's size (datasets/prepare.py)")
    return images, labels


def translate_to_dir(model_uri: str, source: str | Path, out_dir: str | Path, seed: int = 0,
                     workers: int = 1, chunk: int = CHUNK, tracking_uri: Optional[str] = None,
                     progress: bool = True, log: bool = True, **flow_overrides) -> dict:
    """Flow every source image K + kappa steps; ``out_dir/samples.npy`` keeps the input order.
    Also writes source_labels.npy when the source had labels, and grid.png (source rows over
    translated rows)."""
    from fdrl.tracking.registry import load_fdrl_model

    model = load_fdrl_model(model_uri, tracking_uri=tracking_uri)
    images, labels = load_source(source, model.net.in_shape)
    flow = FlowSettings.from_config(model.config, **flow_overrides)
    start = time.perf_counter()
    translated = sample_distributed(model, len(images), seed, workers, chunk, flow, progress,
                                    start=images)
    seconds = time.perf_counter() - start
    summary = {"kind": "translation", "model": f"models:/{model.name}/{model.version}",
               "source": str(source), "n": len(images), "seed": seed, "workers": workers,
               "chunk": chunk, "flow": asdict(flow), "seconds": seconds,
               "images_per_s": len(images) / seconds,
               "samples": storage.join(str(out_dir), "samples.npy"),
               "grid": storage.join(str(out_dir), "grid.png")}
    with storage.staged_dir(out_dir) as out:
        np.save(out / "samples.npy", translated)
        if labels is not None:
            np.save(out / "source_labels.npy", labels)
        k = min(len(images), 2 * GRID_COLUMNS)
        if k > GRID_COLUMNS:
            k -= k % GRID_COLUMNS  # whole rows, so each translated row sits under its sources
        grid_images = _source_over_translated(images[:k], translated[:k])
        grid = save_grid(torch.from_numpy(grid_images), out / "grid.png", nrow=min(k, GRID_COLUMNS))
        if log:
            summary["mlflow_run_id"] = _log_run(
                tracking_uri, {k: summary[k] for k in ("kind", "model", "source", "n", "seed",
                                                       "chunk", "flow")}, [grid],
                {"fdrl.model_run_id": model.run_id})
    return summary


def _source_over_translated(source: np.ndarray, translated: np.ndarray) -> np.ndarray:
    """Rows of up to GRID_COLUMNS sources, each followed by the row of their translations."""
    rows = []
    for begin in range(0, len(source), GRID_COLUMNS):
        rows += [source[begin:begin + GRID_COLUMNS], translated[begin:begin + GRID_COLUMNS]]
    return np.concatenate(rows)
