"""Evaluate a registered FDRL model with domain features: FD / KID / precision / recall for the
prior, after K flow steps, after K + kappa steps, and real-versus-real; the KL-diagnostic curve
along the flow; training-set nearest neighbours (pixel and feature space); a prior-space
interpolation grid. Everything is logged to an MLflow evaluation run linked to the model version.

    python jobs/evaluate.py --model models:/fdrl-mnist@candidate --out runs/eval --promote-if-better fd
"""


import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import json
import re
import sys
from pathlib import Path

import torch

METRICS = ("fd", "kid_mean", "precision", "recall", "fid", "fid_kid_mean")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--data", default=None, help="real shards (default: the model's training data)")
    p.add_argument("--classifier", default=None,
                   help="feature network: folder or models:/NAME@ALIAS (default: trained once per "
                        "labelled dataset; unlabelled datasets get standard FID only)")
    p.add_argument("--n", type=int, default=1000,
                   help="samples per stage (and real images per set); standard FID streams, so "
                        "--n 50000 gives FID-50k (domain metrics and images use at most --domain-n)")
    p.add_argument("--domain-n", type=int, default=5000,
                   help="cap on the in-memory part: domain metrics, KL curve, neighbours")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="standard FID/KID (TF Inception, fdrl.eval.inception) per stage")
    p.add_argument("--fid-reference-n", type=int, default=None,
                   help="real images in the FID reference (default: --n when the data has 2 x --n, "
                        "so real vs real uses the next --n; else all). 0: all images")
    p.add_argument("--fid-weights", default=None, help="Inception weights (default: $FDRL_FID_WEIGHTS "
                                                       "or the pinned packaged file)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors for FID features (GPUs if any)")
    p.add_argument("--extra-steps", type=int, default=None, help="kappa (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="fdrl-eval")
    p.add_argument("--promote-if-better", choices=["fd", "kid_mean", "fid"], default=None,
                   help="set alias 'champion' to this version if its K+kappa metric beats the champion's")
    args = p.parse_args(argv)

    from fdrl.core.flow import FlowSettings
    from fdrl.eval.evaluation import flow_stages, interpolation
    from fdrl.tracking.registry import load_fdrl_model

    try:
        model = load_fdrl_model(args.model, args.tracking_uri)
        data = args.data or model.config.data
        labelled = args.classifier is not None or has_labels(data)
    except (FileNotFoundError, ValueError, LookupError) as err:
        sys.exit(f"error: {err}")
    if not labelled and not args.fid:
        sys.exit(f"error: {data} has no labels (no domain classifier) and --no-fid leaves no metric")
    if args.promote_if_better in ("fd", "kid_mean") and not labelled:
        sys.exit(f"error: --promote-if-better {args.promote_if_better} needs a labelled dataset; use fid")
    flow = FlowSettings.from_config(model.config, extra_steps=args.extra_steps)
    kappa = flow.extra_steps

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    staged = flow_stages(model, min(args.n, args.domain_n), args.seed, flow)
    results: dict[str, dict] = {}
    if labelled:
        try:
            _domain_metrics(args, data, staged, results, out)
        except ValueError as err:
            sys.exit(f"error: {err}")
    if args.fid:
        for stage, m in _standard_fid(args, model, data, flow).items():
            results.setdefault(stage, {}).update(m)
    table = _markdown(results, model, kappa)
    (out / "metrics.md").write_text(table + "\n")
    (out / "metrics.json").write_text(json.dumps({"stages": results, "kl_curve": staged["kl_curve"],
                                                  "labelled": labelled}, indent=1))
    _plot_curve(staged["kl_curve"], flow.flow_steps, out / "kl_curve.png")
    from fdrl.data.images import save_grid
    save_grid(interpolation(model, 6, 8, args.seed, flow), out / "interpolation.png", nrow=8)
    save_grid(staged["samples"]["K+kappa"][:64], out / "samples.png")
    print(table)

    promoted = _log(args, model, results, staged["kl_curve"], out)
    print(f"evaluation written to {out}" + (" ; promoted to champion" if promoted else ""))


def has_labels(data) -> bool:
    """Whether the shard set's first sample carries a .cls label (the domain classifier needs it)."""
    from fdrl.data.manifest import open_shard_set
    from fdrl.data.stream import StreamStats, iter_samples

    for _, members, _ in iter_samples(open_shard_set(data), StreamStats()):
        return "cls" in members
    return False


def _domain_metrics(args, data, staged, results: dict, out: Path) -> None:
    """Domain FD/KID/precision/recall in the classifier's feature space, and neighbour grids."""
    from fdrl.config import default_storage
    from fdrl.eval.evaluation import domain_reference, stage_metrics

    ref = domain_reference(data, min(args.n, args.domain_n), args.seed, default_storage(),
                           args.classifier, args.tracking_uri)
    for stage, m in stage_metrics(ref.features, staged["samples"], ref.real_a, ref.real_b, args.seed).items():
        results.setdefault(stage, {}).update(m)
    _neighbour_grids(staged["samples"]["K+kappa"][:8], ref.train, ref.features, out)


def _standard_fid(args, model, data, flow) -> dict:
    """Standard FID/KID per stage, streamed over Ray actors, against cached reference statistics."""
    from fdrl.data.manifest import open_shard_set
    from fdrl.distributed.fid import stage_fids

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
    from mlflow.tracking import MlflowClient

    from fdrl.tracking.registry import promote
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
        run_id = t.run_id
    client = MlflowClient(uri)
    final = results["K+kappa"]
    client.set_model_version_tag(model.name, model.version, "eval_run_id", run_id or "")
    for m in METRICS:
        if m in final:
            client.set_model_version_tag(model.name, model.version, f"eval_{m}", f"{final[m]:.6g}")
    if not args.promote_if_better:
        return False
    metric = args.promote_if_better
    try:
        champion = client.get_model_version_by_alias(model.name, "champion")
        best = float(champion.tags.get(f"eval_{metric}", "inf"))
    except Exception:  # no champion yet
        best = float("inf")
    if final[metric] < best:
        promote(model.name, model.version, "champion", uri)
        return True
    return False


if __name__ == "__main__":
    main()
