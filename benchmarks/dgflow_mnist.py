"""DGflow on MNIST-5k, end to end through the jobs a user runs: an SN-DCGAN (hinge) and a VAE are
trained on Ray Train and registered; the VAE gets a density-ratio corrector that starts from the
GAN's discriminator (DGflow section 3); each generator is refined in latent space with DGflow
(KL, JS, logD) at the paper's image settings, and its domain FD/KID before and after are read
from the refinement runs. Prints a markdown table; grids are OUT/<model>-<f>/before_after.png.

    python benchmarks/dgflow_mnist.py --out runs/dgflow_mnist --gan-steps 3000 --vae-steps 3000 \\
        --corrector-iters 2000 --n 1000

Steps already done (a registered model, a refinement's metrics.json) are reused, so an
interrupted run continues where it stopped.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FS = ("kl", "js", "logd")


def job(name: str, *args) -> None:
    cmd = [sys.executable, str(ROOT / "jobs" / f"{name}.py"), *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def registered(uri: str, name: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_model_version_by_alias(name, "candidate")
        return True
    except MlflowException:
        return False


def has_corrector(uri: str, name: str) -> bool:
    from fdrl.tracking.generators import load_generator

    return "corrector" in load_generator(f"models:/{name}@candidate", uri).nets


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/dgflow_mnist"))
    p.add_argument("--gan-steps", type=int, default=3000)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--corrector-iters", type=int, default=2000)
    p.add_argument("--n", type=int, default=1000, help="samples refined and scored per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fs", nargs="+", default=list(FS), choices=FS, help="DGflow f-divergences to run")
    args = p.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out}/mlflow.db"
    common = ["--tracking-uri", uri]
    if not registered(uri, "gan-mnist"):
        job("train_gan", "--dataset", "mnist", "--steps", args.gan_steps, "--seed", args.seed,
            "--threads", args.threads, "--storage", out / "generators", *common)
    if not registered(uri, "vae-mnist"):
        job("train_gan", "--dataset", "mnist", "--model", "vae", "--steps", args.vae_steps,
            "--seed", args.seed, "--threads", args.threads, "--storage", out / "generators", *common)
    if not has_corrector(uri, "vae-mnist"):
        job("train_corrector", "--generator", "models:/vae-mnist@candidate",
            "--reference", "models:/gan-mnist@candidate", "--iters", args.corrector_iters,
            "--seed", args.seed, *common)
    rows = []
    for model in ("gan-mnist", "vae-mnist"):
        for f in args.fs:
            target = out / f"{model}-{f}"
            if not (target / "metrics.json").exists():
                job("refine", "--generator", f"models:/{model}@candidate", "--f", f, "--n", args.n,
                    "--seed", args.seed, "--out", target, *common)
            rows.append((model, f, json.loads((target / "metrics.json").read_text())))

    print("\n| generator | DGflow f | steps | FD before | FD after | KID before | KID after "
          "| precision before/after | recall before/after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, f, m in rows:
        b, a = m["before"], m["after"]
        print(f"| {model} | {f} | {m['steps']} | {b['fd']:.2f} | {a['fd']:.2f} | {b['kid_mean']:.4f} | "
              f"{a['kid_mean']:.4f} | {b['precision']:.3f} / {a['precision']:.3f} | "
              f"{b['recall']:.3f} / {a['recall']:.3f} |")
    real = rows[0][2]["before"]
    print(f"\nreal vs real ({rows[0][2]['n']} against {rows[0][2]['n']} images): FD {real['real_fd']:.2f}, "
          f"KID {real['real_kid_mean']:.4f}")


if __name__ == "__main__":
    main()
