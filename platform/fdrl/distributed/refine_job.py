"""``jobs/refine.py --generator``: DGflow (or DOT/DDLS) on a registered generator, written to disk
and logged to MLflow as a refinement run linked to the model version."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fdrl.core.dgflow import RefineSettings, paper_settings

IMAGE_SETTINGS = dict(eta=0.1, gamma=0.01, steps=25)  # DGflow on images (latent space)
CORRECTED_IMAGE_SETTINGS = dict(eta=0.05, gamma=0.01, steps=15)  # with a density-ratio corrector


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
    from fdrl.config import default_storage
    from fdrl.data.manifest import open_shard_set
    from fdrl.eval.evaluation import domain_reference, stage_metrics

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
    ref = domain_reference(data, n, seed, default_storage(), classifier, tracking_uri)
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


def plot_curve(curve, path: Path, pilot=None, chosen=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if pilot is not None:
        ax.plot(range(len(pilot)), pilot, c="tab:gray", label="pilot (--steps auto)")
        ax.axvline(chosen, c="tab:gray", ls="--")
    ax.plot(range(len(curve)), curve, marker=".", label="refinement")
    ax.set_xlabel("step"), ax.set_ylabel("mean log-ratio estimate (-d)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, model, run, title: str) -> dict[str, Path]:
    from fdrl.data.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    base, refined = run.result.base.numpy(), run.result.refined.numpy()
    np.save(out / "base.npy", base)
    np.save(out / "samples.npy", refined)
    paths = {"base": out / "base.npy", "samples": out / "samples.npy", "plot": out / "before_after.png",
             "curve": out / "curve.json", "curve_plot": out / "curve.png"}
    if tuple(model.data_shape) == (2,):
        plot_2d(base, refined, paths["plot"], title, model.info.get("dataset"))
    else:  # odd rows base, even rows refined
        cols, pairs = 8, max(min(len(base) // 8, 4), 1)
        rows = [t for i in range(pairs) for t in (run.result.base[i * cols:(i + 1) * cols],
                                                  run.result.refined[i * cols:(i + 1) * cols])]
        save_grid(torch.cat(rows), paths["plot"], nrow=cols)
    curve = run.result.log_r.tolist()
    paths["curve"].write_text(json.dumps({"mean_log_ratio": curve, "pilot": run.pilot_curve,
                                          "steps": run.settings.steps, "k_eff": run.k_eff}))
    plot_curve(curve, paths["curve_plot"], run.pilot_curve, run.settings.steps)
    return paths


def dgflow_main(args) -> int:
    from fdrl.distributed.refining import refine_model
    from fdrl.tracking.generators import load_generator
    from fdrl.tracking.tracker import Tracker

    auto = args.steps == "auto"
    try:
        steps = None if auto or args.steps is None else int(args.steps)
    except ValueError:
        sys.exit(f"error: --steps must be an integer or 'auto', got {args.steps!r}")
    try:
        model = load_generator(args.generator, args.tracking_uri)
        use_corrector = not args.no_corrector
        settings = settings_for(model, args.method, args.f, args.space, args.eta, args.gamma,
                                steps, use_corrector)
        model.logit(use_corrector)  # no discriminator and no corrector: refuse before any work
        start = None
        if args.input:
            path = Path(args.input)
            if not path.is_file():
                raise FileNotFoundError(f"input samples not found: {path}")
            start = np.load(path, allow_pickle=False)[:args.n or None].astype(np.float32)
            if tuple(start.shape[1:]) != tuple(model.data_shape):
                raise ValueError(f"--input samples have shape {start.shape[1:]}, the model's data "
                                 f"shape is {tuple(model.data_shape)}")
        n = args.n or (5000 if tuple(model.data_shape) == (2,) else 256)
        run = refine_model(model, settings, n, args.seed, args.workers, start, use_corrector,
                           auto=auto, max_steps=args.max_steps, tol=args.tol)
    except (FileNotFoundError, ValueError, LookupError) as err:
        sys.exit(f"error: {err}")

    s = run.settings
    title = f"{s.method}" + (f"-{s.f}" if s.method == "dgflow" else "") + f" ({s.space}, gamma {s.gamma})"
    paths = write_outputs(args.out, model, run, title)
    base, refined = run.result.base.numpy(), run.result.refined.numpy()
    if tuple(model.data_shape) == (2,):
        before, after = quality(model, base, args.seed), quality(model, refined, args.seed)
    else:
        try:
            before, after = image_quality(model, base, refined, args.seed, args.data, args.classifier,
                                          args.tracking_uri)
        except (FileNotFoundError, ValueError, LookupError) as err:
            sys.exit(f"error: image metrics: {err}")
    curve = run.result.log_r.tolist()
    summary = {"before": before, "after": after, "steps": s.steps, "mean_log_ratio_start": curve[0],
               "mean_log_ratio_end": curve[-1], "n": len(run.result.refined)}
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))

    tags = {"model_uri": args.generator, "model_name": model.name, "model_version": model.version,
            "model_run_id": model.run_id, "method": s.method, "input": args.input or "generator"}
    with Tracker(args.experiment, run_name=f"refine-{model.name}-v{model.version}-{title}",
                 tracking_uri=args.tracking_uri, tags=tags) as t:
        t.log_params({**s.__dict__, "n": summary["n"], "seed": args.seed, "workers": args.workers,
                      "steps_auto": auto, "tol": args.tol if auto else None, "k_eff": run.k_eff,
                      "corrector": "corrector" in model.nets and not args.no_corrector})
        t.log_metrics({**{f"before_{k}": v for k, v in before.items()},
                       **{f"after_{k}": v for k, v in after.items()}}, s.steps)
        for step, value in enumerate(curve):
            t.log_metrics({"mean_log_ratio": value}, step)
        for name in ("base", "samples", "plot", "curve", "curve_plot"):
            t.log_artifact(paths[name])
        t.log_artifact(args.out / "metrics.json")
    print(f"refined {summary['n']} samples ({s.steps} steps) -> {paths['samples']}, base {paths['base']}")
    return 0
