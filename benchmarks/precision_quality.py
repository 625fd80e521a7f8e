"""Sample quality at bf16 against fp32 on the 2D toys, from the same seeds: LSIF-chi2 and LR-KL on
25Gaussians and the swiss roll. Runs jobs/fdrl_toy.py (its defaults are the toy table's: 3000
steps, K = 100, batch 1024) two at a time, one thread each, and prints a markdown table with the
fp32 and bf16 metrics side by side: mean +- std over --seeds when there are several.

Usage: python benchmarks/precision_quality.py --out runs/precision_toys [--seeds 0 1 2] [--steps 3000]
Finished runs (OUT/s<seed>/<dataset>/<pairing>/<precision>/metrics.json) are reused.
"""

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRINGS = ("lsif-chi2", "lr-kl")
DATASETS = ("25gaussians", "swissroll")
PRECISIONS = ("fp32", "bf16")


def run(args, seed, dataset, pairing, precision) -> dict:
    target = args.out / f"s{seed}" / dataset / pairing / precision
    if not (target / "metrics.json").exists():
        cmd = [sys.executable, str(ROOT / "jobs/fdrl_toy.py"), "--dataset", dataset,
               "--pairing", pairing, "--precision", precision, "--out", str(target),
               "--steps", str(args.steps), "--seed", str(seed), "--threads", "1"]
        if args.flow_steps:
            cmd += ["--flow-steps", str(args.flow_steps)]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((target / "metrics.json").read_text())


def stat(values, fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def cell(runs: list[dict]) -> str:
    parts = []
    if "pct_high_quality" in runs[0]:
        parts += [stat([m["pct_high_quality"] for m in runs], ".1f") + "% HQ",
                  stat([float(m["modes_covered"]) for m in runs], ".1f") + " modes"]
    parts += ["KDE " + stat([m["kde_score"] for m in runs], ".3f"),
              stat([m["train_seconds"] for m in runs], ".0f") + " s"]
    return ", ".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/precision_toys"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--flow-steps", "-K", type=int, default=None, help="default: the job's (100)")
    p.add_argument("--batch", type=int, default=None, help="default: the job's (1024)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    args = p.parse_args()
    jobs = [(s, d, pr, prec) for s in args.seeds for d in DATASETS for pr in PAIRINGS for prec in PRECISIONS]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(jobs, pool.map(lambda j: run(args, *j), jobs)))
    print(f"steps {args.steps}, K = {args.flow_steps or 'job default'}, batch {args.batch or 'job default'}, "
          f"seeds {' '.join(map(str, args.seeds))}\n")
    print("| dataset | pairing | fp32 | bf16 |")
    print("|---|---|---|---|")
    for d in DATASETS:
        for pr in PAIRINGS:
            cells = [cell([results[s, d, pr, prec] for s in args.seeds]) for prec in PRECISIONS]
            print(f"| {d} | {pr} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
