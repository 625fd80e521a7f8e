"""The 2D toy table: every pairing on both datasets, plus the prior and fresh real data as
reference rows. Runs jobs/fdrl_toy.py two at a time (one thread each, 2 cores) and prints a
markdown table. Usage: python benchmarks/toy_table.py --out runs/toy_table [--steps 3000]"""

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fdrl.core.divergences import PAIRINGS
from fdrl.data.toy import DATASETS, make_toy, toy_metrics

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, dataset: str, pairing: str, steps: int, seed: int) -> dict:
    target = out / dataset / pairing
    if not (target / "metrics.json").exists():
        cmd = [sys.executable, str(ROOT / "jobs/fdrl_toy.py"), "--dataset", dataset, "--pairing", pairing,
               "--out", str(target), "--steps", str(steps), "--seed", str(seed), "--threads", "1"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((target / "metrics.json").read_text())


def row(name, m, seconds="-"):
    hq = f"{m['pct_high_quality']:.1f}" if "pct_high_quality" in m else "-"
    modes = str(m.get("modes_covered", "-"))
    return f"| {name} | {hq} | {modes} | {m['kde_score']:.3f} | {seconds} |"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/toy_table"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    jobs = [(d, pr) for d in DATASETS for pr in PAIRINGS]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda j: run(args.out, *j, args.steps, args.seed), jobs))
    by_job = dict(zip(jobs, results))
    for dataset in DATASETS:
        real = make_toy(dataset, 5000, args.seed + 1)
        prior = np.random.default_rng(args.seed).standard_normal((5000, 2))
        print(f"\n**{dataset}** ({args.steps} steps, seed {args.seed})\n")
        print("| samples | % high quality | modes covered (of 25) | KDE score | wall time (s) |")
        print("|---|---|---|---|---|")
        print(row("prior N(0, I)", toy_metrics(dataset, prior, real)))
        for pairing in PAIRINGS:
            m = by_job[(dataset, pairing)]
            print(row(f"FDRL {pairing}", m, f"{m['wall_seconds']:.0f}"))
        print(row("real data (ceiling)", toy_metrics(dataset, make_toy(dataset, 5000, args.seed + 2), real)))


if __name__ == "__main__":
    main()
