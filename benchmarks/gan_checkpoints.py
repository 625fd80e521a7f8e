"""Quality of a 2D GAN's checkpoints over training (jobs/train_gan.py --checkpoint-every):
% high quality, modes covered and KDE score of 5000 samples of each checkpoint's generator.

    python benchmarks/gan_checkpoints.py runs/bases/gan-25gaussians-s0-gp10/gen/gan-25gaussians-s0-gp10 \\
        [--plot out.png]

Reads the run folder's fdrl_gan_run.json (net specs) and every checkpoint_*/ Ray Train kept.
"""

import fdrl  # noqa: F401

import argparse
import json
from pathlib import Path

import torch


def main(argv=None):
    from safetensors.torch import load_file

    from fdrl.core.generator_nets import build_net
    from fdrl.data.toy import make_toy, toy_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--plot", type=Path, default=None, help="scatter of the latest checkpoint")
    args = p.parse_args(argv)
    cfg = json.loads((args.run_dir / "fdrl_gan_run.json").read_text())["config"]
    real = make_toy(cfg["dataset"], args.n, 10_000)
    z = torch.randn(args.n, cfg["latent_dim"], generator=torch.Generator().manual_seed(0))
    rows = []
    for ckpt in sorted(args.run_dir.glob("checkpoint_*")):
        if not (ckpt / "state.pt").exists():
            continue
        step = torch.load(ckpt / "state.pt", weights_only=True)["step"]
        g = build_net(cfg["specs"]["generator"])
        g.load_state_dict(load_file(str(ckpt / "generator.safetensors")))
        with torch.no_grad():
            x = g.eval()(z).numpy()
        m = toy_metrics(cfg["dataset"], x, real)
        rows.append((step, m, x))
        print(json.dumps({"step": step, **{k: round(v, 3) for k, v in m.items()}}), flush=True)
    if args.plot and rows:
        from fdrl.workflows.refine import plot_2d

        step, _, x = max(rows, key=lambda r: r[0])
        plot_2d(x, x, args.plot, f"step {step}", cfg["dataset"])
    return rows


if __name__ == "__main__":
    main()
