"""Draw N samples from a registered FDRL model on Ray workers: K + kappa flow steps (Algorithm 2).

    python jobs/sample.py --model models:/fdrl-mnist@champion --n 1000 --out samples/ --workers 2

Class-conditional (FDRL eq. 31, a registered classifier guiding the flow with weight --phi):

    python jobs/sample.py --model models:/fdrl-mnist@champion --classifier models:/classifier-mnist@candidate \
        --label all --n 100 --phi 0.5 --out cond/

writes OUT/samples.npy (classes x N x C x H x W; N x C x H x W for one label), labels.npy and
grid.png (one row per class), and logs the run with its grid to MLflow (experiment fdrl-sampling).

Translation (a model trained by jobs/fdrl_translate.py): --input (a shard folder or a .npy of
source images) flows each given image K + kappa steps and writes OUT/samples.npy in input order.

Writes OUT/samples.npy (N x C x H x W float32 in [-1, 1]) and OUT/grid.png (the first 64). The
model is loaded with its sha256 check and without unpickling (fdrl.tracking.registry.load_fdrl_model).
Chunk i of --chunk samples is seeded from (--seed, i): the same seed and chunk size give the same
samples for any --workers. Runs as `python jobs/sample.py` (local Ray) or under
`ray job submit` (the cluster's workers; one GPU each when it has GPUs).
"""


import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import json
import sys

from fdrl.core.chunks import CHUNK
from fdrl.data import storage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--n", type=int, help="number of samples (per label with --label); "
                   "not used with --input")
    p.add_argument("--classifier", help="models:/NAME@ALIAS (or a folder) of the guiding classifier")
    p.add_argument("--label", help="class to generate: an index, indices like 1,7, or 'all' (one row each)")
    p.add_argument("--phi", type=float, default=0.5,
                   help="guidance weight (eq. 31; 0.5 is the best measured on MNIST-5k, BENCHMARKS.md)")
    p.add_argument("--input", help="translate: a shard folder or .npy of source images")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="Ray actors (1 GPU or 1 CPU each)")
    p.add_argument("--chunk", type=int, default=CHUNK,
                   help="samples per chunk, the unit of seeding and of work per actor")
    p.add_argument("--flow-steps", type=int, help="K (default: the model's config)")
    p.add_argument("--extra-steps", type=int, help="kappa (default: the model's config)")
    p.add_argument("--eta", type=float, help="flow step size (default: the model's config)")
    p.add_argument("--nu", type=float, help="flow noise (default: the model's config)")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    args = p.parse_args(argv)

    from fdrl.tracking.registry import ModelNotFoundError, TamperedArtifactError
    from fdrl.workflows.sample import conditional_to_dir, sample_to_dir, translate_to_dir

    if (args.classifier is None) != (args.label is None):
        p.error("--classifier and --label go together")
    if args.input and args.classifier:
        p.error("--input (translation) and --classifier (conditional) are separate runs")
    if not args.input and args.n is None:
        p.error("--n is required unless --input gives the images")
    flow_args = dict(flow_steps=args.flow_steps, extra_steps=args.extra_steps, eta=args.eta, nu=args.nu)
    try:
        if args.classifier:
            summary = conditional_to_dir(args.model, args.classifier, args.label, args.n, args.out,
                                         args.phi, args.seed, args.workers, args.chunk,
                                         args.tracking_uri, **flow_args)
        elif args.input:
            summary = translate_to_dir(args.model, args.input, args.out, args.seed, args.workers,
                                       args.chunk, args.tracking_uri, **flow_args)
        else:
            summary = sample_to_dir(args.model, args.n, args.out, args.seed, args.workers,
                                    args.chunk, args.tracking_uri, **flow_args)
    except (ModelNotFoundError, TamperedArtifactError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    if summary.get("kind"):
        print(f"\n{summary['kind']}: {summary['model']}, {summary['seconds']:.1f} s, "
              f"{summary['images_per_s']:.1f} images/s\nsamples: {summary['samples']}\n"
              f"grid:    {summary['grid']}")
        storage.write_text(storage.join(args.out, "summary.json"), json.dumps(summary, indent=1))
        return 0
    flow = summary["flow"]
    print(f"\n{summary['n']} samples from {summary['model']} with K + kappa = "
          f"{flow['flow_steps']} + {flow['extra_steps']} flow steps on {summary['workers']} "
          f"workers: {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s")
    print(f"samples: {summary['samples']}\ngrid:    {summary['grid']}")
    storage.write_text(storage.join(args.out, "summary.json"), json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
