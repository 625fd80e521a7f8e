"""Sampling on Ray: the core sampler's chunks spread over actors.

``sample_distributed`` hands chunks (index, start, size) to actors (one GPU each when the cluster
has GPUs, else one CPU with one torch thread), keeps every actor busy and advances a tqdm bar as
chunks finish. Each chunk is ``fdrl.core.sampler.sample_chunk``, seeded from (seed, index) alone,
so 1 worker and 8 workers give the same array. Samples are clamped to the image range [-1, 1].
The same actors draw class-guided rows (a classifier and labels, ``fdrl.core.guidance``) and flow
given starting points (translation); ``fdrl.distributed.composed`` writes those runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fdrl.core.divergences import get_pairing
from fdrl.core.guidance import class_potential, frozen
from fdrl.core.flow import FlowSettings
from fdrl.core.networks import build_network
from fdrl.core.priors import Prior
from fdrl.core.sampler import CHUNK, chunks, sample_chunk
from fdrl.data.images import save_grid

IN_FLIGHT = 2  # chunks queued per actor, so an actor never idles while its next chunk travels


class _SamplerActor:
    """Holds one copy of the network and prior; draws whole chunks."""

    def __init__(self, arch: str, state: dict, prior: Optional[Prior], pairing_name: str,
                 flow: FlowSettings, use_gpu: bool, guide: Optional[dict] = None):
        if use_gpu:
            self.device = torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to this GPU
            # The flow's input gradients run conv backward kernels; pick deterministic ones.
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(1)  # one CPU per actor; also keeps CPU results bit-identical
        self.net = build_network(arch)
        # torch.tensor copies: arrays from Ray's object store are read-only.
        self.net.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
        self.net.to(self.device).eval().requires_grad_(False)
        self.prior = None if prior is None else prior.to(self.device)
        self.pairing, self.flow = get_pairing(pairing_name), flow
        self.classifier, self.phi = None, 0.0
        if guide is not None:  # {"architecture": ClassifierConfig dict, "state": arrays, "phi"}
            from fdrl.eval.classifier import ClassifierConfig, MnistClassifier

            clf = MnistClassifier(ClassifierConfig.from_dict(guide["architecture"]))
            clf.load_state_dict({k: torch.tensor(v) for k, v in guide["state"].items()})
            self.classifier, self.phi = frozen(clf.to(self.device)), float(guide["phi"])

    def sample(self, seed: int, index: int, size: int, label: Optional[int] = None,
               start: Optional[np.ndarray] = None) -> np.ndarray:
        potential = None if label is None else class_potential(self.classifier, label, self.phi, self.pairing)
        part = sample_chunk(self.net, self.pairing, self.flow, seed, index, size, prior=self.prior,
                            start=None if start is None else torch.tensor(start),  # a copy: Ray arrays are read-only
                            extra_potential=potential, device=self.device)
        return part.x.clamp(-1, 1).numpy()


def sample_distributed(model, n: int, seed: int, workers: int, batch: int = CHUNK,
                       flow: Optional[FlowSettings] = None, progress: bool = True, *,
                       guide: Optional[dict] = None, labels: Optional[list[int]] = None,
                       start: Optional[np.ndarray] = None) -> np.ndarray:
    """N x C x H x W float32 samples from ``model`` (a ``registry.LoadedModel``) on ``workers``
    Ray actors. Connects to (or starts) Ray with ``ray.init()`` if it is not initialised.

    With ``guide`` (classifier architecture, weights, phi) and ``labels``: an array
    (len(labels), N, C, H, W), row i guided towards ``labels[i]``. Every row uses the same
    chunk seeds, so rows start from the same prior draws and differ by the guidance only.
    With ``start`` (N x C x H x W): those points are flowed instead of prior draws."""
    import ray
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    flow = flow or FlowSettings.from_config(model.config)
    if start is not None and len(start) != n:
        raise ValueError(f"n={n} but {len(start)} starting points were given")
    if start is None and model.prior is None:
        raise ValueError(f"model {model.name} has no prior to sample from (a translation model): "
                         f"give the source images to flow (--input)")
    rows = [None] if labels is None else list(labels)
    if labels is not None and guide is None:
        raise ValueError("class labels need a classifier to guide the flow")
    todo = [(row, index, begin, size) for row in range(len(rows))
            for index, begin, size in chunks(n, batch)]
    if not ray.is_initialized():
        ray.init()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    actor_cls = ray.remote(**({"num_gpus": 1} if use_gpu else {"num_cpus": 1}))(_SamplerActor)
    state = {k: v.detach().cpu().numpy() for k, v in model.net.state_dict().items()}
    state_ref = ray.put(state)
    prior_ref = ray.put(None if model.prior is None else model.prior.to("cpu"))
    guide_ref = ray.put(guide)
    actors = [actor_cls.remote(model.config.arch, state_ref, prior_ref, model.config.pairing,
                               flow, use_gpu, guide_ref) for _ in range(min(workers, len(todo)))]
    out = np.empty((len(rows), n, *model.net.in_shape), np.float32)
    pending: dict = {}  # object ref -> (actor, row, begin)
    queue = list(todo)

    def submit(actor):
        row, index, begin, size = queue.pop(0)
        points = None if start is None else np.ascontiguousarray(start[begin:begin + size], np.float32)
        pending[actor.sample.remote(seed, index, size, rows[row], points)] = (actor, row, begin)

    try:
        for _ in range(IN_FLIGHT):
            for actor in actors:
                if queue:
                    submit(actor)
        with tqdm(total=n * len(rows), unit="img", desc=f"sampling ({len(actors)} workers)",
                  disable=not progress) as bar:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                actor, row, begin = pending.pop(ref)
                x = ray.get(ref)
                out[row, begin:begin + len(x)] = x
                bar.update(len(x))
                if queue:
                    submit(actor)  # the actor that just finished takes the next chunk
    finally:
        for actor in actors:
            ray.kill(actor)
    return out if labels is not None else out[0]


def save_samples(samples: np.ndarray, out_dir: str | Path, grid: int = 64) -> tuple[Path, Path]:
    """``out_dir/samples.npy`` (all samples) and ``out_dir/grid.png`` (the first ``grid``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", samples)
    grid_path = save_grid(torch.from_numpy(samples[:grid]), out / "grid.png")
    return out / "samples.npy", grid_path


def sample_to_dir(model_uri: str, n: int, out_dir: str | Path, seed: int = 0, workers: int = 1,
                  batch: int = CHUNK, tracking_uri: Optional[str] = None,
                  progress: bool = True, **flow_overrides) -> dict:
    """What ``jobs/sample.py`` does: load a registered model (hash-checked, no unpickling), sample
    on Ray, write samples.npy and grid.png. Returns a summary (paths, timing, settings)."""
    from fdrl.tracking.registry import load_fdrl_model

    import ray

    model = load_fdrl_model(model_uri, tracking_uri=tracking_uri)
    flow = FlowSettings.from_config(model.config, **flow_overrides)
    if not ray.is_initialized():
        ray.init()  # before the clock: the rate counts actor start-up, not the cluster's
    start = time.perf_counter()
    samples = sample_distributed(model, n, seed, workers, batch, flow, progress)
    seconds = time.perf_counter() - start
    npy, grid = save_samples(samples, out_dir)
    return {"model": f"models:/{model.name}/{model.version}", "run_id": model.run_id,
            "samples": str(npy), "grid": str(grid), "n": n, "seed": seed, "workers": workers,
            "batch": batch, "flow": asdict(flow), "seconds": seconds,
            "images_per_s": n / seconds}


def load_samples(spec: str, n: Optional[int], seed: int, tracking_uri: Optional[str]) -> np.ndarray:
    """Samples to refine or translate: a .npy file (N x C x H x W in [-1, 1]) or
    models:/NAME@ALIAS of a registered FDRL generator, sampled here with its own flow."""
    if spec.startswith("models:/"):
        from fdrl.core.sampler import sample
        from fdrl.tracking.registry import load_fdrl_model

        source = load_fdrl_model(spec, tracking_uri)
        drawn = sample(source.net, source.pairing, source.flow, n or 256, seed, prior=source.prior)
        return drawn.x.clamp(-1, 1).numpy()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"input samples not found: {path} (a .npy file or models:/NAME@ALIAS)")
    array = np.load(path, allow_pickle=False)
    return array[:n] if n else array
