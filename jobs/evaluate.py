"""Evaluate a registered FDRL model with domain features: FD / KID / precision / recall for the
prior, after K flow steps, after K + kappa steps, and real-versus-real; the KL-diagnostic curve
along the flow; training-set nearest neighbours (pixel and feature space); a prior-space
interpolation grid. Everything is logged to an MLflow evaluation run linked to the model version.

    python jobs/evaluate.py --model models:/fdrl-mnist@candidate --out runs/eval --promote-if-better fd
"""


import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import sys



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
    p.add_argument("--out", required=True, help="output folder (a local path or an s3:// or gs:// URI)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="fdrl-eval")
    p.add_argument("--promote-if-better", choices=["fd", "kid_mean", "fid"], default=None,
                   help="set alias 'champion' to this version if its K+kappa metric beats the champion's")
    args = p.parse_args(argv)

    from fdrl.workflows.evaluate import evaluate_model

    try:
        result = evaluate_model(**vars(args))
    except (FileNotFoundError, ValueError, LookupError) as err:
        sys.exit(f"error: {err}")
    print(result["table"])
    print(f"evaluation written to {args.out}" + (" ; promoted to champion" if result["promoted"] else ""))


if __name__ == "__main__":
    main()

