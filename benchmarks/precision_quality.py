"""Sample quality at bf16 against fp32 on the 2D toys, from the same seeds: LSIF-chi2 and LR-KL on
25Gaussians and the swiss roll. Runs jobs/fdrl_toy.py two at a time (one thread each) and prints
a markdown table with the fp32 and bf16 metrics side by side.

Usage: python benchmarks/precision_quality.py --out runs/precision_toys [--steps 1000 -K 50]
"""

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRINGS = ("lsif-chi2", "lr-kl")
DATASETS = ("25gaussians", "swissroll")
PRECISIONS = ("fp32", "bf16")


def run(args, dataset, pairing, precision) -> dict:
    target = args.out / dataset / pairing / precision
    if not (target / "metrics.json").exists():
        cmd = [sys.executable, str(ROOT / "jobs/fdrl_toy.py"), "--dataset", dataset,
               "--pairing", pairing, "--precision", precision, "--out", str(target),
               "--steps", str(args.steps), "--flow-steps", str(args.flow_steps),
               "--batch", str(args.batch), "--seed", str(args.seed), "--threads", "1"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((target / "metrics.json").read_text())


def cell(m: dict) -> str:
    hq = f"{m['pct_high_quality']:.1f}% HQ, {m['modes_covered']} modes, " if "pct_high_quality" in m else ""
    return f"{hq}KDE {m['kde_score']:.3f}, {m['train_seconds']:.0f} s"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/precision_toys"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--flow-steps", "-K", type=int, default=50)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    jobs = [(d, pr, prec) for d in DATASETS for pr in PAIRINGS for prec in PRECISIONS]
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(jobs, pool.map(lambda j: run(args, *j), jobs)))
    print(f"steps {args.steps}, K = {args.flow_steps}, batch {args.batch}, seed {args.seed}\n")
    print("| dataset | pairing | fp32 | bf16 |")
    print("|---|---|---|---|")
    for d in DATASETS:
        for pr in PAIRINGS:
            print(f"| {d} | {pr} | {cell(results[d, pr, 'fp32'])} | {cell(results[d, pr, 'bf16'])} |")


if __name__ == "__main__":
    main()
