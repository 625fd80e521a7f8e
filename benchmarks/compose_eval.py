"""Measurements for the FDRL compositions (BENCHMARKS.md, "Compositions").

conditional: for each guiding classifier and phi, jobs/sample.py's conditional run (--label all,
N per class), then an independently trained classifier (another seed and architecture) labels
the samples: accuracy per class, and the domain FD (in that classifier's feature space) of each
class's samples against the real digits of that class.

translation: translate the first N source images with a translation model; class preservation
(the target-domain classifier gives the source label) and domain FD against the real target,
next to the same figures for the untranslated (up-sampled) sources.

    python benchmarks/compose_eval.py conditional --model models:/fdrl-mnist@candidate \\
        --guide robust=models:/classifier-mnist@candidate --guide plain=models:/classifier-mnist-plain@candidate \\
        --evaluator models:/classifier-mnist-eval@candidate --data data/mnist5k --phi 0.05 0.1 0.3 --n 100 --out runs/cond
    python benchmarks/compose_eval.py translation --model models:/fdrl-digits-to-mnist5k@candidate \\
        --source data/digits --target data/mnist5k --evaluator models:/classifier-mnist-eval@candidate --n 500 --out runs/translate
"""

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow)

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fdrl.workflows.sample import conditional_to_dir, load_source, translate_to_dir
from fdrl.eval.classifier import load_classifier, load_labeled
from fdrl.eval.metrics import domain_features, frechet_distance_from_moments


@torch.no_grad()
def predict(clf, x: np.ndarray) -> np.ndarray:
    return torch.cat([clf(b).argmax(1) for b in torch.from_numpy(np.asarray(x)).clamp(-1, 1).split(256)]).numpy()


def fd(clf, a: np.ndarray, b: torch.Tensor) -> float:
    ma, _ = domain_features(clf.features, torch.from_numpy(a).split(256), keep=False)
    mb, _ = domain_features(clf.features, b.split(256), keep=False)
    return frechet_distance_from_moments(ma, mb)


def load_evaluator(args):
    """The project's classifier (models:/ or folder), or with --independent the LeNet of
    benchmarks/independent_classifier.py, which shares no code with the project."""
    if args.independent:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from independent_classifier import load

        return load(args.evaluator)
    return load_classifier(args.evaluator, args.tracking_uri)


def conditional(args) -> dict:
    evaluator = load_evaluator(args)
    real, real_labels, _ = load_labeled(args.data)
    results = {}
    for phi in args.phi:  # phi-major: the first phi given is measured for every guide first
        for spec in args.guide:
            name, uri = spec.split("=", 1)
            key = f"{name} phi={phi}"
            out = args.out / f"{name}_phi{phi}"
            summary = conditional_to_dir(args.model, uri, "all", args.n, out, phi=phi,
                                         seed=args.seed, workers=args.workers,
                                         tracking_uri=args.tracking_uri, progress=False)
            rows = np.load(out / "samples.npy")  # classes x n x C x H x W
            per_class = {}
            for c in range(len(rows)):
                acc = float((predict(evaluator, rows[c]) == c).mean())
                per_class[c] = {"accuracy": acc,
                                "fd": fd(evaluator, rows[c], real[real_labels == c])}
            results[key] = {"per_class": per_class, "seconds": summary["seconds"],
                            "mean_accuracy": float(np.mean([v["accuracy"] for v in per_class.values()])),
                            "mean_fd": float(np.mean([v["fd"] for v in per_class.values()])),
                            "grid": summary["grid"], "mlflow_run_id": summary.get("mlflow_run_id")}
            print(key, json.dumps({k: results[key][k] for k in ("mean_accuracy", "mean_fd", "seconds")}),
                  flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| guide, φ | " + " | ".join(str(c) for c in range(10)) + " | mean acc | mean FD |",
             "|---" * 13 + "|"]
    for key, r in results.items():
        accs = " | ".join(f"{r['per_class'][c]['accuracy']:.2f}" for c in range(10))
        lines.append(f"| {key} | {accs} | {r['mean_accuracy']:.3f} | {r['mean_fd']:.1f} |")
    lines += ["", "| guide, φ | " + " | ".join(f"FD {c}" for c in range(10)) + " |", "|---" * 11 + "|"]
    for key, r in results.items():
        lines.append(f"| {key} | " + " | ".join(f"{r['per_class'][c]['fd']:.1f}" for c in range(10)) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def translation(args) -> dict:
    evaluator = load_evaluator(args)
    source, labels = load_source(args.source, (1, 32, 32) if args.independent else evaluator.config.in_shape)
    source, labels = source[:args.n], labels[:args.n]
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "source.npy", source)
    summary = translate_to_dir(args.model, args.out / "source.npy", args.out, seed=args.seed,
                               workers=args.workers, tracking_uri=args.tracking_uri, progress=False)
    translated = np.load(args.out / "samples.npy")
    target, _, _ = load_labeled(args.target)
    result = {
        "n": len(source), "seconds": summary["seconds"],
        "class_preservation": float((predict(evaluator, translated) == labels).mean()),
        "source_accuracy_before": float((predict(evaluator, source) == labels).mean()),
        "fd_translated_vs_target": fd(evaluator, translated, target),
        "fd_source_vs_target": fd(evaluator, source, target),
        "fd_target_half_vs_half": fd(evaluator, target[::2].numpy(), target[1::2]),
        "grid": summary["grid"], "mlflow_run_id": summary.get("mlflow_run_id"),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def translation_steps(args) -> dict:
    """Class preservation and domain FD against the number of flow steps: one flow of the first
    N sources (the core sampler, in this process), recorded at each count in --flow-steps."""
    from fdrl.core.sampler import sample
    from fdrl.tracking.registry import load_fdrl_model

    torch.set_num_threads(args.threads)
    evaluator = load_evaluator(args)
    model = load_fdrl_model(args.model, args.tracking_uri)
    source, labels = load_source(args.source, model.net.in_shape)
    source, labels = source[:args.n], labels[:args.n]
    target, _, _ = load_labeled(args.target)
    steps = sorted(set(args.flow_steps))
    run = sample(model.net, model.pairing, model.flow, seed=args.seed, start=torch.from_numpy(source),
                 steps=steps[-1], record=[k for k in steps if k > 0], trace=True)
    rows = {}
    for k in steps:
        x = source if k == 0 else run.stages[k].clamp(-1, 1).numpy()
        rows[k] = {"class_preservation": float((predict(evaluator, x) == labels).mean()),
                   "fd_vs_target": fd(evaluator, x, target), "mean_log_r": float(run.log_r[k])}
        print(k, json.dumps(rows[k]), flush=True)
    floor = fd(evaluator, target[::2].numpy(), target[1::2])
    result = {"n": len(source), "by_steps": rows, "fd_target_half_vs_half": floor,
              "model_flow": {"K": model.flow.flow_steps, "kappa": model.flow.extra_steps, "eta": model.flow.eta}}
    (args.out / "translation_steps.json").write_text(json.dumps(result, indent=1))
    lines = ["| flow steps | class preservation | FD to target | mean log r |", "|---:|---:|---:|---:|"]
    lines += [f"| {k} | {r['class_preservation']:.3f} | {r['fd_vs_target']:.1f} | {r['mean_log_r']:.3f} |"
              for k, r in rows.items()]
    lines.append(f"\nFD floor (target half vs half): {floor:.2f}")
    (args.out / "translation_steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.grid:
        from fdrl.data.images import save_grid

        picks = [k for k in steps]
        rows_img = [torch.from_numpy(source[:10]) if k == 0 else run.stages[k][:10].clamp(-1, 1) for k in picks]
        save_grid(torch.cat(rows_img), args.out / "translation_steps.png", nrow=10)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("conditional")
    c.add_argument("--guide", action="append", required=True, help="NAME=models:/... (repeatable)")
    c.add_argument("--data", required=True, help="labelled real shards (per-class FD)")
    c.add_argument("--phi", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    c.add_argument("--n", type=int, default=100, help="samples per class")
    t = sub.add_parser("translation")
    t.add_argument("--source", required=True)
    t.add_argument("--target", required=True)
    t.add_argument("--n", type=int, default=500)
    ts = sub.add_parser("translation-steps")
    ts.add_argument("--source", required=True)
    ts.add_argument("--target", required=True)
    ts.add_argument("--n", type=int, default=500)
    ts.add_argument("--flow-steps", type=int, nargs="+", default=[0, 5, 10, 20, 40, 60, 80, 120])
    ts.add_argument("--threads", type=int, default=2)
    ts.add_argument("--grid", action="store_true", help="first 10 sources, one row per step count")
    for q in (c, t, ts):
        q.add_argument("--model", required=True)
        q.add_argument("--evaluator", required=True, help="independent classifier (metrics)")
        q.add_argument("--independent", action="store_true",
                       help="--evaluator is a benchmarks/independent_classifier.py folder")
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--workers", type=int, default=2)
        q.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    {"conditional": conditional, "translation": translation, "translation-steps": translation_steps}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
