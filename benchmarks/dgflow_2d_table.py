"""DGflow's Table 1 (2D), qualitatively: refine registered WGAN-GPs with DOT, DDLS and DGflow
(KL, JS, logD; gamma 0.01 and 0) at the paper's settings, over seeds; mean +- std per row.

    python benchmarks/dgflow_2d_table.py --tracking-uri sqlite:///runs/table/mlflow.db \\
        --models gan-{dataset}-s{seed}@candidate --seeds 0 1 2 --out runs/table

    # one base per dataset, 10 refinement runs of 5000 samples (refinement seeds 0..9)
    python benchmarks/dgflow_2d_table.py --tracking-uri URI --models gan-{dataset}-paper@candidate \
        --seeds 0 --runs 10 --label paper --out runs/table

Runs can be split (e.g. one process per dataset and seed) and merged with --aggregate, which
reads every OUT/results-*.json. Each (dataset, seed) uses its own generator (trained with jobs/train_gan.py --seed S) and refines
--n samples with refinement seed S (with --runs R: R runs, refinement seeds 0..R-1), as one chunk (seeded like chunk 0: the same arrays as
``jobs/refine.py --seed S`` for n <= 64; larger n differ only in which draws feed which sample). Writes OUT/table.md, OUT/results.json and, for the first seed,
OUT/scatter-<dataset>[-<label>]-<row>.png (base left, refined right, data in grey).
"""

import fdrl  # noqa: F401

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROWS = [("WGAN-GP (base)", None), ("DOT", dict(method="dot")), ("DDLS", dict(method="ddls"))] + [
    (f"DGflow-{f} (gamma {g})", dict(method="dgflow", f=f, gamma=g))
    for g in (0.01, 0.0) for f in ("kl", "js", "logd")]


def main(argv=None):
    from fdrl.data.toy import make_toy
    from fdrl.tracking.generators import load_generator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["25gaussians", "swissroll"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", default="gan-{dataset}-s{seed}@candidate")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--runs", type=int, default=0,
                   help="refinement runs per generator (seeds 0..R-1); 0: one run with the generator's seed")
    p.add_argument("--label", default="", help="names this row group in the table, files and plots")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--aggregate", action="store_true", help="only merge OUT/results-*.json into OUT/table.md")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.aggregate:
        merged = {}
        for path in sorted(args.out.glob("results-*.json")):
            for dataset, rows in json.loads(path.read_text()).items():
                for row, ms in rows.items():
                    merged.setdefault(dataset, {}).setdefault(row, []).extend(ms)
        (args.out / "table.md").write_text(table(merged))
        print(table(merged))
        return

    results = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            model = load_generator("models:/" + args.models.format(dataset=dataset, seed=seed),
                                   args.tracking_uri)
            for rseed in (range(args.runs) if args.runs else [seed]):
                real = make_toy(dataset, args.n, 10_000 + rseed)
                run_rows(dataset, seed, rseed, model, real, args, results, first=rseed == (0 if args.runs else seed))
            tag = f"-{args.label}" if args.label else ""
            name = f"results{tag}-{'-'.join(args.datasets)}-s{'-'.join(map(str, args.seeds))}.json"
            (args.out / name).write_text(json.dumps(results, indent=1))
    print(table(results))


def run_rows(dataset, seed, rseed, model, real, args, results, first):
    """Every row of ROWS on one generator with refinement seed ``rseed`` (the same latents)."""
    from fdrl.core.dgflow import paper_settings
    from fdrl.data.toy import toy_metrics
    from fdrl.workflows.refine import plot_2d
    from fdrl.workflows.refine import refine_model

    for row, spec in ROWS:
        start = time.perf_counter()
        # the base row needs only the base samples (the same latents for every row)
        s = paper_settings(**(spec or dict(method="dgflow", steps=1)))
        run = refine_model(model, s, args.n, rseed, chunk=args.n)
        x = run.result.stages[0].numpy() if spec is None else run.result.x.numpy()
        m = toy_metrics(dataset, x, real)
        m["seconds"] = time.perf_counter() - start
        m["log_ratio_start"], m["log_ratio_end"] = float(run.result.log_r[0]), float(run.result.log_r[-1])
        results.setdefault(dataset, {}).setdefault(row, []).append(m)
        print(dataset, seed, rseed, row, json.dumps({k: round(v, 3) for k, v in m.items()}), flush=True)
        if first and seed == args.seeds[0]:
            slug = row.split(" (base)")[0].replace(" (gamma ", "-g").replace(")", "").replace(" ", "")
            tag = f"-{args.label}" if args.label else ""
            plot_2d(run.result.stages[0].numpy(), x, args.out / f"scatter-{dataset}{tag}-{slug}.png",
                    f"{row} {args.label}".strip(), dataset)
        m["seed"], m["refine_seed"] = seed, rseed


def table(results) -> str:
    lines = []
    for dataset, rows in results.items():
        cols = ["pct_high_quality", "modes_covered", "kde_score"] if dataset == "25gaussians" else ["kde_score"]
        lines += [f"\n**{dataset}** (mean ± std over {len(next(iter(rows.values())))} runs)\n",
                  "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for row, ms in rows.items():
            cells = [f"{np.mean([m[c] for m in ms]):.2f} ± {np.std([m[c] for m in ms]):.2f}" for c in cols]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
