"""What ``jobs/refine.py`` does: refine samples and log the run to MLflow, linked to the model.

* ``refine_generator``: DGflow (or DOT/DDLS) on a registered generator, with its discriminator
  (plus corrector) as the ratio. Chunks of the core refinement (``core.dgflow.refine_chunk``,
  seeded per (seed, chunk index)) run in this process or on Ray actors, so the arrays never
  depend on the number of workers.
* ``refine_with_ratio``: given samples pushed along a registered FDRL ratio model's flow, DGflow's
  update with the FDRL ratio as the estimator (``core.sampler.refinement_flow``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fdrl.core.chunks import CHUNK, chunks, merge
from fdrl.core.chunks import Samples
from fdrl.data import storage
from fdrl.core.dgflow import (ChunkRefiner, RefineSettings, auto_steps, lipschitz_estimate,
                              paper_settings, refine, refine_item)

IMAGE_SETTINGS = dict(eta=0.1, gamma=0.01, steps=25)  # DGflow on images (latent space)
CORRECTED_IMAGE_SETTINGS = dict(eta=0.05, gamma=0.01, steps=15)  # with a density-ratio corrector


PILOT = 256  # samples of the pilot run that picks the step count for --steps auto
K_EFF_SAMPLES, K_EFF_SEED = 1024, 0  # DOT's Lipschitz estimate: a fixed draw of base samples


@dataclass
class RefineRun:
    result: Samples  # refined samples x, unrefined ones as stages[0], the log-ratio curve
    settings: RefineSettings
    k_eff: Optional[float] = None
    pilot_curve: Optional[list] = None  # with --steps auto: the pilot's log-ratio curve


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
    """Refine ``n`` samples of a ``GeneratorModel`` (or the given ``start`` samples, data space),
    in this process (``workers=0``) or on that many Ray actors. ``auto``: a pilot run of up to
    ``max_steps`` on the first chunks picks the step count at which the mean log-ratio estimate
    stops improving by ``tol`` (``core.dgflow.auto_steps``). ``chunk`` (in this process only)
    changes the seeding unit: benchmarks use one big chunk for speed."""
    if chunk != CHUNK and workers > 0:
        raise ValueError("Ray workers refine the standard chunks; a custom chunk runs with workers=0")
    if start is not None:
        n = len(start)
    if n is None or n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    logit = model.logit(use_corrector)
    k_eff = dot_k_eff(model, use_corrector, start) if settings.method == "dot" else None
    given = None if start is None else torch.from_numpy(np.asarray(start)).float()
    pilot_curve = None
    if auto:
        pilot_n = min(n, PILOT)
        pilot = refine(replace(settings, steps=max_steps), logit, pilot_n, seed,
                       generator=model.generator, latent_dim=model.latent_dim,
                       data_shape=model.data_shape, k_eff=k_eff, chunk=chunk,
                       start=None if given is None else given[:pilot_n])
        pilot_curve = pilot.log_r.tolist()
        settings = replace(settings, steps=auto_steps(pilot_curve, tol))
    if workers <= 0:
        result = refine(settings, logit, n, seed, generator=model.generator,
                        latent_dim=model.latent_dim, data_shape=model.data_shape, start=given,
                        k_eff=k_eff, chunk=chunk)
        return RefineRun(result, settings, k_eff, pilot_curve)
    from fdrl.distributed.fanout import fan_out

    todo = chunks(n, CHUNK)
    items = [(seed, c, None if given is None else given[c.start:c.start + c.size]) for c in todo]
    parts = fan_out(workers, ChunkRefiner, [settings, logit, model.generator, model.latent_dim,
                                            model.data_shape, k_eff], refine_item, items, gpu=False)
    result = merge([(c.size, part) for c, part in zip(todo, parts)])
    return RefineRun(result, settings, k_eff, pilot_curve)


def settings_for(model, method: str, f: str, space: Optional[str], eta: Optional[float],
                 gamma: Optional[float], steps: Optional[int], use_corrector: bool) -> RefineSettings:
    """The paper's settings for the model's data (2D or images), with the given overrides."""
    two_d = tuple(model.data_shape) == (2,)
    if two_d or method != "dgflow":
        base = paper_settings(method, f).__dict__.copy()
    else:
        corrected = use_corrector and "corrector" in model.nets
        base = dict(method=method, f=f, space="latent",
                    **(CORRECTED_IMAGE_SETTINGS if corrected else IMAGE_SETTINGS))
    base.update({k: v for k, v in dict(space=space, eta=eta, gamma=gamma, steps=steps).items()
                 if v is not None})
    return RefineSettings(**base)


def quality(model, x: np.ndarray, seed: int, tracking_uri: Optional[str] = None) -> dict:
    """2D: % high quality, modes covered (25gaussians), KDE score against fresh data."""
    from fdrl.data.toy import DATASETS, make_toy, toy_metrics

    dataset = model.info.get("dataset")
    if dataset in DATASETS:
        return toy_metrics(dataset, x, make_toy(dataset, len(x), seed + 10_000))
    return {}


def image_quality(model, base: np.ndarray, refined: np.ndarray, seed: int, data: Optional[str] = None,
                  classifier: Optional[str] = None, tracking_uri: Optional[str] = None) -> tuple[dict, dict]:
    """Images: domain FD / KID / precision / recall of the unrefined and the refined samples
    against as many real images of the training set, in the feature space of the dataset's
    classifier (the one ``jobs/evaluate.py`` uses, so FDRL and DGflow figures compare). The
    reference is ``data`` (labelled shards), or the MNIST-5k shards for a generator trained on
    mnist; a model with neither gets no image metrics: ({}, {})."""
    from fdrl.data.manifest import open_shard_set
    from fdrl.eval.evaluation import domain_reference, stage_metrics
    from fdrl.workflows.evaluate import domain_classifier

    if data is None and model.info.get("dataset") == "mnist":
        from fdrl.data.writer import ensure_mnist_shards
        from fdrl.presets import MNIST_DATA

        data = str(ensure_mnist_shards(MNIST_DATA))
    if data is None:
        return {}, {}
    shard_set = open_shard_set(data)
    if tuple(shard_set.shape) != tuple(model.data_shape):
        raise ValueError(f"--data {data} holds {tuple(shard_set.shape)} images, the generator makes "
                         f"{tuple(model.data_shape)}")
    n = min(len(base), shard_set.total // 2)
    ref = domain_reference(data, n, seed, domain_classifier(data, classifier, tracking_uri))
    staged = {"before": torch.from_numpy(base[:n]), "after": torch.from_numpy(refined[:n])}
    metrics = stage_metrics(ref.features, staged, ref.real_a, ref.real_b, seed)
    real = {f"real_{k}": v for k, v in metrics["real (baseline)"].items()}
    return {**metrics["before"], **real}, metrics["after"]


def plot_2d(base: np.ndarray, refined: np.ndarray, path: Path, title: str, dataset: Optional[str]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fdrl.data.toy import DATASETS, make_toy

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6), sharex=True, sharey=True)
    real = make_toy(dataset, 5000, 12345) if dataset in DATASETS else None
    for ax, x, name, colour in ((axes[0], base, "base", "tab:blue"), (axes[1], refined, title, "tab:red")):
        if real is not None:
            ax.scatter(real[:, 0], real[:, 1], s=1, c="tab:gray", alpha=0.25)
        ax.scatter(x[:, 0], x[:, 1], s=1, c=colour, alpha=0.5)
        ax.set_title(name), ax.set_aspect("equal")
        ax.set_xlim(-2.2, 2.2), ax.set_ylim(-2.2, 2.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(curve, path: Path, pilot=None, chosen=None,
               ylabel: str = "mean log-ratio estimate (-d)"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if pilot is not None:
        ax.plot(range(len(pilot)), pilot, c="tab:gray", label="pilot (--steps auto)")
        ax.axvline(chosen, c="tab:gray", ls="--")
    ax.plot(range(len(curve)), curve, marker=".", label="refinement")
    ax.set_xlabel("step"), ax.set_ylabel(ylabel)
    if pilot is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, model, run, title: str) -> dict[str, Path]:
    from fdrl.data.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    base, refined = run.result.stages[0].numpy(), run.result.x.numpy()
    np.save(out / "base.npy", base)
    np.save(out / "samples.npy", refined)
    paths = {"base": out / "base.npy", "samples": out / "samples.npy", "plot": out / "before_after.png",
             "curve": out / "curve.json", "curve_plot": out / "curve.png"}
    if tuple(model.data_shape) == (2,):
        plot_2d(base, refined, paths["plot"], title, model.info.get("dataset"))
    else:  # odd rows base, even rows refined
        cols, pairs = 8, max(min(len(base) // 8, 4), 1)
        rows = [t for i in range(pairs) for t in (run.result.stages[0][i * cols:(i + 1) * cols],
                                                  run.result.x[i * cols:(i + 1) * cols])]
        save_grid(torch.cat(rows), paths["plot"], nrow=cols)
    curve = run.result.log_r.tolist()
    paths["curve"].write_text(json.dumps({"mean_log_ratio": curve, "pilot": run.pilot_curve,
                                          "steps": run.settings.steps, "k_eff": run.k_eff}))
    plot_curve(curve, paths["curve_plot"], run.pilot_curve, run.settings.steps)
    return paths


def refine_generator(generator: str, out: str, *, method: str = "dgflow", f: str = "kl",
                     space: Optional[str] = None, steps: Optional[str | int] = None,
                     eta: Optional[float] = None, gamma: Optional[float] = None,
                     n: Optional[int] = None, seed: int = 0, workers: int = 0,
                     input: Optional[str] = None, no_corrector: bool = False, tol: float = 1e-3,
                     max_steps: int = 500, data: Optional[str] = None,
                     classifier: Optional[str] = None, tracking_uri: Optional[str] = None,
                     experiment: str = "fdrl-refine") -> dict:
    """DGflow (``--method dgflow|dot|ddls``) on the registered ``generator``: base.npy,
    samples.npy, before_after.png, the log-ratio curve and metrics.json (2D: % high quality,
    modes, KDE; images: domain FD/KID/precision/recall) in ``out``, and a refinement run in MLflow.
    ``steps``: an integer, 'auto' or None (the paper's). Bad input raises ValueError,
    FileNotFoundError or LookupError naming it, before any work. Returns the metrics summary."""
    from fdrl.tracking.generators import load_generator
    from fdrl.tracking.tracker import Tracker
    from fdrl.workflows.sample import load_npy

    auto = steps == "auto"
    try:
        steps = None if auto or steps is None else int(steps)
    except ValueError:
        raise ValueError(f"--steps must be an integer or 'auto', got {steps!r}") from None
    model = load_generator(generator, tracking_uri)
    use_corrector = not no_corrector
    settings = settings_for(model, method, f, space, eta, gamma, steps, use_corrector)
    model.logit(use_corrector)  # no discriminator and no corrector: refuse before any work
    start = None
    if input:
        if not storage.is_file(input):
            raise FileNotFoundError(f"input samples not found: {input}")
        start = load_npy(input)[:n or None].astype(np.float32)
        if tuple(start.shape[1:]) != tuple(model.data_shape):
            raise ValueError(f"--input samples have shape {start.shape[1:]}, the model's data "
                             f"shape is {tuple(model.data_shape)}")
    n = n or (5000 if tuple(model.data_shape) == (2,) else 256)
    run = refine_model(model, settings, n, seed, workers, start, use_corrector,
                       auto=auto, max_steps=max_steps, tol=tol)

    s = run.settings
    title = f"{s.method}" + (f"-{s.f}" if s.method == "dgflow" else "") + f" ({s.space}, gamma {s.gamma})"
    base, refined = run.result.stages[0].numpy(), run.result.x.numpy()
    if tuple(model.data_shape) == (2,):
        before, after = quality(model, base, seed), quality(model, refined, seed)
    else:
        before, after = image_quality(model, base, refined, seed, data, classifier, tracking_uri)
    curve = run.result.log_r.tolist()
    summary = {"before": before, "after": after, "steps": s.steps, "mean_log_ratio_start": curve[0],
               "mean_log_ratio_end": curve[-1], "n": len(refined),
               "samples": storage.join(str(out), "samples.npy"), "base": storage.join(str(out), "base.npy")}
    tags = {"model_uri": generator, "model_name": model.name, "model_version": model.version,
            "model_run_id": model.run_id, "method": s.method, "input": input or "generator"}
    with storage.staged_dir(out) as local:
        paths = write_outputs(local, model, run, title)
        (local / "metrics.json").write_text(json.dumps(summary, indent=1))
        with Tracker(experiment, run_name=f"refine-{model.name}-v{model.version}-{title}",
                     tracking_uri=tracking_uri, tags=tags) as t:
            t.log_params({**s.__dict__, "n": summary["n"], "seed": seed, "workers": workers,
                          "steps_auto": auto, "tol": tol if auto else None, "k_eff": run.k_eff,
                          "corrector": "corrector" in model.nets and use_corrector})
            t.log_metrics({**{f"before_{k}": v for k, v in before.items()},
                           **{f"after_{k}": v for k, v in after.items()}}, s.steps)
            for step, value in enumerate(curve):
                t.log_metrics({"mean_log_ratio": value}, step)
            for name in ("base", "samples", "plot", "curve", "curve_plot"):
                t.log_artifact(paths[name])
            t.log_artifact(local / "metrics.json")
    return summary


def refine_with_ratio(model_uri: str, input: str, out: str, *, steps: int = 25,
                      eta: Optional[float] = None, gamma: Optional[float] = None,
                      n: Optional[int] = None, seed: int = 0, tracking_uri: Optional[str] = None,
                      experiment: str = "fdrl-refine") -> dict:
    """Push the samples of ``input`` (a .npy, or models:/ of an FDRL model to sample) along the
    registered FDRL ratio model's flow, x <- x - eta grad f'(r(x)) + sqrt(2 eta gamma) xi:
    refined.npy, before_after.png, kl.json and kl.png in ``out``, and a refinement run in MLflow.
    Default gamma: nu^2 / (2 eta), the model's own flow noise."""
    from fdrl.core.networks import check_input
    from fdrl.core.sampler import refinement_flow, sample
    from fdrl.data.images import save_grid
    from fdrl.tracking.registry import load_fdrl_model
    from fdrl.tracking.tracker import Tracker
    from fdrl.workflows.sample import load_samples

    model = load_fdrl_model(model_uri, tracking_uri)
    before = torch.from_numpy(load_samples(input, n, seed, tracking_uri)).float()
    check_input(before, model.net.in_shape)
    eta = eta if eta is not None else model.config.eta
    gamma = gamma if gamma is not None else model.config.nu ** 2 / (2 * eta)
    refined = sample(model.net, model.pairing, refinement_flow(steps, eta, gamma), seed=seed,
                     start=before, trace=True)
    after, curve = refined.x, refined.log_r.tolist()

    with storage.staged_dir(out) as local:
        np.save(local / "refined.npy", after.numpy())
        cols = 8
        pairs = min(len(before) // cols, 4) or 1
        rows = [t for i in range(pairs) for t in (before[i * cols:(i + 1) * cols], after[i * cols:(i + 1) * cols])]
        save_grid(torch.cat(rows), local / "before_after.png", nrow=cols)
        (local / "kl.json").write_text(json.dumps({"mean_log_r": curve, "eta": eta, "gamma": gamma}))
        plot_curve(curve, local / "kl.png", ylabel="mean log r (KL diagnostic)")
        with Tracker(experiment, run_name=f"refine-{model.name}-v{model.version}",
                     tracking_uri=tracking_uri,
                     tags={"model_uri": model_uri, "model_version": model.version, "input": input}) as t:
            t.log_params({"steps": steps, "eta": eta, "gamma": gamma, "n": len(before)})
            for step, value in enumerate(curve):
                t.log_metrics({"kl_diagnostic": value}, step)
            for name in ("before_after.png", "kl.png", "kl.json"):
                t.log_artifact(local / name)
    return {"refined": storage.join(str(out), "refined.npy"), "n": len(before), "mean_log_r": curve,
            "eta": eta, "gamma": gamma}
