"""Does ``--steps auto`` pick a good step count? DGflow-KL (data space, eta 0.01, gamma 0.01) on
registered 2D WGAN-GPs: the quality after a range of step counts against the auto choice.

    python benchmarks/dgflow_auto_steps.py --tracking-uri sqlite:///runs/table/mlflow.db \\
        --models gan-{dataset}-s0@candidate --out runs/auto_steps
"""

import fdrl  # noqa: F401

import argparse
import json
from pathlib import Path


def main(argv=None):
    from fdrl.core.dgflow import auto_steps, paper_settings
    from fdrl.data.toy import make_toy, toy_metrics
    from fdrl.workflows.refine import refine_model
    from fdrl.tracking.generators import load_generator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["25gaussians", "swissroll"])
    p.add_argument("--models", default="gan-{dataset}-s0@candidate")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 200, 400])
    p.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for dataset in args.datasets:
        model = load_generator("models:/" + args.models.format(dataset=dataset), args.tracking_uri)
        real = make_toy(dataset, args.n, 777)
        longest = paper_settings("dgflow", "kl", steps=max(args.steps))
        full = refine_model(model, longest, args.n, 0, chunk=args.n)
        curve = full.result.log_r.tolist()
        rows = {}
        for k in args.steps:  # the same trajectories cut at k steps (same seed, one chunk)
            run = refine_model(model, paper_settings("dgflow", "kl", steps=k), args.n, 0, chunk=args.n)
            rows[k] = toy_metrics(dataset, run.result.x.numpy(), real)
            rows[k]["mean_log_ratio"] = curve[k]
        rows[0] = toy_metrics(dataset, full.result.stages[0].numpy(), real)
        rows[0]["mean_log_ratio"] = curve[0]
        # the job's rule: a pilot on the first 256 samples
        pilot = refine_model(model, longest, 256, 0).result.log_r.tolist()
        chosen = {str(tol): auto_steps(pilot, tol) for tol in args.tols}
        report[dataset] = {"by_steps": dict(sorted(rows.items())), "auto": chosen, "curve": curve}
        print(dataset, json.dumps({"auto": chosen, "by_steps": {k: {m: round(v, 3) for m, v in r.items()}
                                                              for k, r in sorted(rows.items())}}), flush=True)
    (args.out / "auto_steps.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
