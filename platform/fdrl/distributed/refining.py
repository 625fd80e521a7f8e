"""DGflow refinement of a registered generator, chunk by chunk over Ray tasks.

Each task rebuilds the generator model from plain data (specs and numpy weights) and runs
``core.dgflow.refine`` on its share of chunk indices with one torch thread; a chunk is seeded from
(seed, index) alone, so the arrays are the same for any number of workers. ``workers=0`` runs
every chunk in this process (no Ray).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fdrl.core.dgflow import RefineSettings, Refined, auto_steps, lipschitz_estimate, refine
from fdrl.core.sampler import CHUNK, chunks

PILOT = 256  # samples of the pilot run that picks the step count for --steps auto
K_EFF_SAMPLES, K_EFF_SEED = 1024, 0  # DOT's Lipschitz estimate: a fixed draw of base samples


@dataclass
class RefineRun:
    result: Refined
    settings: RefineSettings
    k_eff: Optional[float] = None
    pilot_curve: Optional[list] = None  # with --steps auto: the pilot's log-ratio curve


def _plain(model) -> dict:
    """What a Ray task needs to rebuild the model: its config and weights as numpy."""
    config = {"kind": model.kind, "latent_dim": model.latent_dim, "data_shape": list(model.data_shape),
              "nets": model.specs, "info": model.info}
    weights = {role: {k: v.numpy() for k, v in net.state_dict().items()}
               for role, net in model.nets.items()}
    return {"config": config, "weights": weights}


def _refine_share(plain: dict, settings: RefineSettings, n: int, seed: int, indices: list,
                  start: Optional[np.ndarray], k_eff: Optional[float], use_corrector: bool):
    from fdrl.tracking.generators import build_generator

    torch.set_num_threads(1)  # one CPU per task; also keeps results bit-identical across workers
    weights = {r: {k: torch.tensor(v) for k, v in w.items()} for r, w in plain["weights"].items()}
    model = build_generator(plain["config"], weights)
    return _run(model, settings, n, seed, indices, start, k_eff, use_corrector)


def _run(model, settings, n, seed, indices, start, k_eff, use_corrector, chunk=CHUNK) -> Refined:
    return refine(settings, model.logit(use_corrector), n, seed, generator=model.generator,
                  latent_dim=model.latent_dim, data_shape=model.data_shape,
                  start=None if start is None else torch.from_numpy(np.asarray(start)).float(),
                  k_eff=k_eff, indices=indices, chunk=chunk)


def dot_k_eff(model, use_corrector: bool = True, start: Optional[np.ndarray] = None) -> float:
    """DOT's k_eff from a fixed draw of the model's base samples (or the given samples)."""
    if start is not None:
        x = torch.from_numpy(np.asarray(start[:K_EFF_SAMPLES])).float()
    else:
        gen = torch.Generator().manual_seed(K_EFF_SEED)
        with torch.no_grad():
            x = model.generator(torch.randn(K_EFF_SAMPLES, model.latent_dim, generator=gen))
    return lipschitz_estimate(model.logit(use_corrector), x)


def refine_model(model, settings: RefineSettings, n: int, seed: int = 0, workers: int = 0,
                 start: Optional[np.ndarray] = None, use_corrector: bool = True,
                 auto: bool = False, max_steps: int = 500, tol: float = 1e-3,
                 chunk: int = CHUNK) -> RefineRun:
    """Refine ``n`` samples of a ``GeneratorModel`` (or the given ``start`` samples, data space).
    ``auto``: a pilot run of up to ``max_steps`` on the first chunks picks the step count at
    which the mean log-ratio estimate stops improving by ``tol`` (``core.dgflow.auto_steps``).
    ``chunk`` (in this process only) changes the seeding unit: benchmarks use one big chunk for speed."""
    if chunk != CHUNK and workers > 0:
        raise ValueError("Ray workers split the standard chunks; a custom chunk runs with workers=0")
    if start is not None:
        n = len(start)
    if n is None or n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    k_eff = dot_k_eff(model, use_corrector, start) if settings.method == "dot" else None
    pilot_curve = None
    if auto:
        pilot_settings = RefineSettings(**{**settings.__dict__, "steps": max_steps})
        pilot_n = min(n, PILOT)
        pilot = _run(model, pilot_settings, pilot_n, seed, None,
                     None if start is None else start[:pilot_n], k_eff, use_corrector, chunk)
        pilot_curve = pilot.log_r.tolist()
        settings = RefineSettings(**{**settings.__dict__, "steps": auto_steps(pilot_curve, tol)})
    todo = chunks(n, CHUNK)
    if workers <= 0:
        result = _run(model, settings, n, seed, None, start, k_eff, use_corrector, chunk)
        return RefineRun(result, settings, k_eff, pilot_curve)

    import ray

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=1)(_refine_share)
    plain_ref = ray.put(_plain(model))
    shares = [[index for index, _, _ in todo[w::workers]] for w in range(min(workers, len(todo)))]
    parts = ray.get([task.remote(plain_ref, settings, n, seed, share, start, k_eff, use_corrector)
                     for share in shares])
    sizes = {index: size for index, _, size in todo}
    base = np.empty((n, *model.data_shape), np.float32)
    refined = np.empty_like(base)
    curve = None
    for share, part in zip(shares, parts):
        offset = 0
        for index in share:
            begin, size = index * CHUNK, sizes[index]
            base[begin:begin + size] = part.base[offset:offset + size].numpy()
            refined[begin:begin + size] = part.refined[offset:offset + size].numpy()
            offset += size
        weight = sum(sizes[i] for i in share)
        curve = part.log_r * weight if curve is None else curve + part.log_r * weight
    result = Refined(torch.from_numpy(base), torch.from_numpy(refined), curve / n)
    return RefineRun(result, settings, k_eff, pilot_curve)
