"""Behaviour fingerprint: sha256 of what three user commands write, for a bit-for-bit comparison
of two versions of the code (run it once per checkout, compare the JSON).

1. the demo on a fixed short run (`jobs/fdrl_mnist.py --steps 20 ...`): every sample grid and the
   registered model's weights (the sha256 the registry recorded for ema.safetensors);
2. `jobs/sample.py` from that model, on 2 Ray workers;
3. a DGflow 2D refinement: a small WGAN-GP (`jobs/train_gan.py`), refined in this process and on
   2 Ray workers (`jobs/refine.py --generator`).

Each command runs through its command line in a fresh folder (FDRL_HOME = that folder).

    python benchmarks/fingerprint.py --out /tmp/fp-new > new.json
    PYTHONPATH=/path/to/old/platform python benchmarks/fingerprint.py --out /tmp/fp-old --repo /path/to/old > old.json
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(repo: Path, out: Path, *args: str) -> None:
    env = dict(os.environ, FDRL_HOME=str(out), PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, *args], cwd=out, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="an empty folder for the runs")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the checkout whose jobs/ to run (default: this one)")
    args = p.parse_args()
    out, jobs = args.out.resolve(), args.repo.resolve() / "jobs"
    out.mkdir(parents=True, exist_ok=True)
    found = {}

    run(args.repo, out, str(jobs / "fdrl_mnist.py"), "--steps", "20", "--log-every", "10",
        "--checkpoint-every", "10", "--sample-every", "10", "--decay-steps", "12", "16", "--no-fid")
    for grid in sorted(out.glob("runs/mnist-*/samples/*.png")):
        found[f"demo grid {grid.name}"] = sha(grid)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    version = client.get_model_version_by_alias("fdrl-mnist", "candidate")
    found["demo registered ema.safetensors"] = version.tags["sha256/artifacts/ema.safetensors"]

    run(args.repo, out, str(jobs / "sample.py"), "--model", "models:/fdrl-mnist@candidate", "--n",
        "100", "--workers", "2", "--seed", "3", "--out", str(out / "samples"))
    found["sample.py samples.npy"] = sha(out / "samples" / "samples.npy")

    run(args.repo, out, str(jobs / "train_gan.py"), "--dataset", "25gaussians", "--steps", "60",
        "--width", "64", "--log-every", "20")
    for workers in ("0", "2"):
        dest = out / f"refine-w{workers}"
        run(args.repo, out, str(jobs / "refine.py"), "--generator", "models:/gan-25gaussians@candidate",
            "--n", "300", "--workers", workers, "--seed", "1", "--out", str(dest))
        for name in ("base.npy", "samples.npy"):
            found[f"refine --workers {workers} {name}"] = sha(dest / name)
    print(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
