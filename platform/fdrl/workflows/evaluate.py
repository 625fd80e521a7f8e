"""What ``jobs/evaluate.py`` does: evaluate a registered FDRL model with domain features and the
standard FID, per flow stage (prior, K, K + kappa, and real-versus-real), with the KL-diagnostic
curve, training-set nearest neighbours and a prior-space interpolation grid. Everything is
logged to an MLflow evaluation run linked to the model version, whose tags record the final
metrics; ``promote_if_better`` moves ``champion`` when a metric improves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from fdrl.data import storage

METRICS = ("fd", "kid_mean", "precision", "recall", "fid", "fid_kid_mean")


def evaluate_model(**options) -> dict:
    """``options``: the flags of ``jobs/evaluate.py`` (model, out, data, classifier, n, domain_n,
    fid, fid_reference_n, fid_weights, workers, extra_steps, seed, tracking_uri, experiment,
    promote_if_better). Returns {"stages", "kl_curve", "labelled", "promoted", "table"}. Bad input
    raises ValueError / FileNotFoundError / LookupError naming it, before any work."""
    from fdrl.core.flow import FlowSettings
    from fdrl.data.images import save_grid
    from fdrl.eval.evaluation import flow_stages, interpolation
    from fdrl.tracking.registry import load_fdrl_model

    args = SimpleNamespace(**options)
    model = load_fdrl_model(args.model, args.tracking_uri)
    data = args.data or model.config.data
    labelled = args.classifier is not None or has_labels(data)
    if not labelled and not args.fid:
        raise ValueError(f"{data} has no labels (no domain classifier) and --no-fid leaves no metric")
    if args.promote_if_better in ("fd", "kid_mean") and not labelled:
        raise ValueError(f"--promote-if-better {args.promote_if_better} needs a labelled dataset; use fid")
    flow = FlowSettings.from_config(model.config, extra_steps=args.extra_steps)

    staged = flow_stages(model, min(args.n, args.domain_n), args.seed, flow)
    results: dict[str, dict] = {}
    with storage.staged_dir(args.out) as out:  # a folder, or uploaded to a URI at the end
        if labelled:
            _domain_metrics(args, data, staged, results, out)
        if args.fid:
            for stage, m in _standard_fid(args, model, data, flow).items():
                results.setdefault(stage, {}).update(m)
        table = _markdown(results, model, flow.extra_steps)
        (out / "metrics.md").write_text(table + "\n")
        (out / "metrics.json").write_text(json.dumps({"stages": results, "kl_curve": staged["kl_curve"],
                                                      "labelled": labelled}, indent=1))
        _plot_curve(staged["kl_curve"], flow.flow_steps, out / "kl_curve.png")
        save_grid(interpolation(model, 6, 8, args.seed, flow), out / "interpolation.png", nrow=8)
        save_grid(staged["samples"]["K+kappa"][:64], out / "samples.png")
        promoted = _log(args, model, results, staged["kl_curve"], out)
    return {"stages": results, "kl_curve": staged["kl_curve"], "labelled": labelled,
            "promoted": promoted, "table": table}


def has_labels(data) -> bool:
    """Whether the shard set's first sample carries a .cls label (the domain classifier needs it)."""
    from fdrl.data.manifest import open_shard_set
    from fdrl.data.stream import StreamStats, iter_samples

    for _, members, _ in iter_samples(open_shard_set(data), StreamStats()):
        return "cls" in members
    return False


def domain_classifier(data: str, classifier: Optional[str], tracking_uri: Optional[str]):
    """``classifier`` (a folder or models:/...), else the dataset's own feature classifier,
    trained once per manifest under the storage."""
    if classifier:
        from fdrl.tracking.classifiers import open_classifier

        return open_classifier(classifier, tracking_uri)
    from fdrl.config import storage_root
    from fdrl.data.manifest import manifest_hash
    from fdrl.eval.classifier import load_classifier
    from fdrl.eval.evaluation import ensure_classifier

    from fdrl.data import storage

    return load_classifier(storage.node_copy(ensure_classifier(data, storage_root(""),
                                                                manifest_hash(data))))


def _domain_metrics(args, data, staged, results: dict, out: Path) -> None:
    """Domain FD/KID/precision/recall in the classifier's feature space, and neighbour grids."""
    from fdrl.eval.evaluation import domain_reference, stage_metrics

    ref = domain_reference(data, min(args.n, args.domain_n), args.seed,
                           domain_classifier(data, args.classifier, args.tracking_uri))
    for stage, m in stage_metrics(ref.features, staged["samples"], ref.real_a, ref.real_b, args.seed).items():
        results.setdefault(stage, {}).update(m)
    _neighbour_grids(staged["samples"]["K+kappa"][:8], ref.train, ref.features, out)


def _standard_fid(args, model, data, flow) -> dict:
    """Standard FID/KID per stage, streamed over Ray actors, against cached reference statistics."""
    from fdrl.data.manifest import open_shard_set
    from fdrl.workflows.standard_fid import stage_fids

    total = open_shard_set(data).total
    limit = args.fid_reference_n
    if limit is None:
        limit = args.n if total >= 2 * args.n else 0
    fids = stage_fids(model, data, args.n, args.seed, flow=flow, reference_limit=limit or None,
                      workers=args.workers, weights=args.fid_weights, tracking_uri=args.tracking_uri)
    return {stage: {"fid": m["fid"], "fid_kid_mean": m["kid_mean"], "fid_kid_std": m["kid_std"],
                    "fid_n": m["n_samples"], "fid_reference_n": m["n_reference"]}
            for stage, m in fids.items()}


def _markdown(results, model, kappa) -> str:
    k = model.flow.flow_steps
    names = {"prior": "prior", "K": f"K = {k} steps", "K+kappa": f"K + kappa = {k + kappa} steps",
             "real (baseline)": "real vs real"}
    first = next(iter(results.values()))
    domain, standard = "fd" in first, "fid" in first
    head = ["samples"] + (["FD", "KID", "precision", "recall"] if domain else []) \
        + (["standard FID", "standard KID"] if standard else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, m in results.items():
        cells = [names[stage]]
        if domain:
            cells += [f"{m['fd']:.3f}", f"{m['kid_mean']:.4f} ± {m['kid_std']:.4f}",
                      f"{m['precision']:.3f}", f"{m['recall']:.3f}"]
        if standard:
            cells += [f"{m['fid']:.2f}", f"{m['fid_kid_mean']:.4f} ± {m['fid_kid_std']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if standard:
        lines.append(f"\nstandard FID: FID-{int(first['fid_n'])} against {int(first['fid_reference_n'])} "
                     "real images (TF Inception; comparable to torch-fidelity / TTUR at the same N)")
    return "\n".join(lines)


def _plot_curve(curve, k, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(range(len(curve)), curve, marker=".")
    ax.axvline(k, color="gray", linestyle="--", label=f"K = {k} (training length)")
    ax.set_xlabel("flow step"), ax.set_ylabel("mean log r (KL diagnostic)"), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _neighbour_grids(queries, train, features, out: Path):
    from fdrl.eval.evaluation import nearest_neighbours
    from fdrl.data.images import save_grid

    nn = nearest_neighbours(queries, train, features, k=5)
    for space, idx in nn.items():
        rows = [torch.cat([q[None], train[i]]) for q, i in zip(queries, idx)]
        save_grid(torch.cat(rows), out / f"neighbours_{space}.png", nrow=6)


def metric_stage_name(stage: str) -> str:
    """'K+kappa' -> 'K_plus_kappa', 'real (baseline)' -> 'real_baseline': valid MLflow names."""
    return re.sub(r"[^A-Za-z0-9]+", "_", stage.replace("+", "_plus_")).strip("_")


def _log(args, model, results, curve, out: Path) -> bool:
    from fdrl.tracking.registry import promote_if_better, record_evaluation
    from fdrl.tracking.tracker import Tracker, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    tags = {"model_name": model.name, "model_version": model.version, "model_uri": args.model,
            "source_run_id": model.run_id}
    with Tracker(args.experiment, run_name=f"eval-{model.name}-v{model.version}", tracking_uri=uri,
                 tags=tags) as t:
        t.log_params({"n": args.n, "seed": args.seed, "classifier": args.classifier or "per-dataset",
                      "fid": args.fid})
        t.log_metrics({f"{metric_stage_name(stage)}.{m}": v[m]
                       for stage, v in results.items() for m in METRICS if m in v}, 0)
        for step, value in enumerate(curve):
            t.log_metrics({"kl_diagnostic": value}, step)
        for f in sorted(out.iterdir()):
            t.log_artifact(f)
    final = results["K+kappa"]
    record_evaluation(model.name, model.version, t.run_id or "",
                      {m: final[m] for m in METRICS if m in final}, uri)
    if not args.promote_if_better:
        return False
    metric = args.promote_if_better
    return promote_if_better(model.name, model.version, metric, final[metric], uri)
