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

METRICS = ("fd", "kid_mean", "precision", "recall")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--data", default=None, help="real shards (default: the model's training data)")
    p.add_argument("--classifier", default=None,
                   help="feature network: folder or models:/NAME@ALIAS (default: trained once per dataset)")
    p.add_argument("--n", type=int, default=1000, help="samples per stage (and real images per set)")
    p.add_argument("--extra-steps", type=int, default=None, help="kappa (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="fdrl-eval")
    p.add_argument("--promote-if-better", choices=["fd", "kid_mean"], default=None,
                   help="set alias 'champion' to this version if its K+kappa metric beats the champion's")
    args = p.parse_args(argv)

    from fdrl.core.flow import FlowSettings
    from fdrl.eval.evaluation import ensure_classifier, flow_stages, interpolation, stage_metrics
    from fdrl.eval.classifier import load_classifier
    from fdrl.eval.metrics import shard_batches
    from fdrl.tracking.registry import load_fdrl_model
    from fdrl.data.manifest import manifest_hash
    from fdrl.config import default_storage

    try:
        model = load_fdrl_model(args.model, args.tracking_uri)
        data = args.data or model.config.data
        train = torch.cat(list(shard_batches(data)))
    except (FileNotFoundError, ValueError, LookupError) as err:
        sys.exit(f"error: {err}")
    if len(train) < 2 * args.n:
        sys.exit(f"error: {data} has {len(train)} images; need 2 x --n = {2 * args.n}")
    classifier = args.classifier or ensure_classifier(data, default_storage(), manifest_hash(data))
    features = load_classifier(classifier, args.tracking_uri).features
    flow = FlowSettings.from_config(model.config, extra_steps=args.extra_steps)
    kappa = flow.extra_steps

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    staged = flow_stages(model, args.n, args.seed, flow)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    real_a, real_b = train[order[:args.n]], train[order[args.n:2 * args.n]]
    results = stage_metrics(features, staged["samples"], real_a, real_b, args.seed)
    table = _markdown(results, model, kappa)
    (out / "metrics.md").write_text(table + "\n")
    (out / "metrics.json").write_text(json.dumps({"stages": results, "kl_curve": staged["kl_curve"]}, indent=1))
    _plot_curve(staged["kl_curve"], flow.flow_steps, out / "kl_curve.png")
    _neighbour_grids(staged["samples"]["K+kappa"][:8], train, features, out)
    from fdrl.data.images import save_grid
    save_grid(interpolation(model, 6, 8, args.seed, flow), out / "interpolation.png", nrow=8)
    save_grid(staged["samples"]["K+kappa"][:64], out / "samples.png")
    print(table)

    promoted = _log(args, model, results, staged["kl_curve"], out)
    print(f"evaluation written to {out}" + (" ; promoted to champion" if promoted else ""))


def _markdown(results, model, kappa) -> str:
    k = model.flow.flow_steps
    names = {"prior": "prior", "K": f"K = {k} steps", "K+kappa": f"K + kappa = {k + kappa} steps",
             "real (baseline)": "real vs real"}
    lines = ["| samples | FD | KID | precision | recall |", "|---|---|---|---|---|"]
    for stage, m in results.items():
        lines.append(f"| {names[stage]} | {m['fd']:.3f} | {m['kid_mean']:.4f} ± {m['kid_std']:.4f} "
                     f"| {m['precision']:.3f} | {m['recall']:.3f} |")
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
        t.log_params({"n": args.n, "seed": args.seed, "classifier": args.classifier or "per-dataset"})
        t.log_metrics({f"{metric_stage_name(stage)}.{m}": v[m]
                       for stage, v in results.items() for m in METRICS}, 0)
        for step, value in enumerate(curve):
            t.log_metrics({"kl_diagnostic": value}, step)
        for f in sorted(out.iterdir()):
            t.log_artifact(f)
        run_id = t.run_id
    client = MlflowClient(uri)
    final = results["K+kappa"]
    client.set_model_version_tag(model.name, model.version, "eval_run_id", run_id or "")
    for m in METRICS:
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
