"""Train a baseline generator on Ray Train and register it for DGflow (alias ``candidate``).

    python jobs/train_gan.py --dataset 25gaussians --seed 0                 # WGAN-GP, as DGflow's appendix
    python jobs/train_gan.py --dataset 25gaussians --seed 0 --resume        # continue an interrupted run
    python jobs/train_gan.py --dataset mnist --steps 3000                    # SN-DCGAN, hinge loss
    python jobs/train_gan.py --dataset mnist --model vae --steps 3000        # VAE (decoder + encoder)

2D defaults follow DGflow's appendix: fully connected ReLU nets (3 x 512), gradient penalty 10,
10k generator iterations, batch 256, Adam 1e-4 (0.5, 0.9), 5 critic updates per generator update
(over an hour on one core here). Checkpoints every --checkpoint-every generator steps; --resume
continues --run-name (or the latest run of the model and seed) from its last one. Registered as
gan-<dataset> (or vae-<dataset>) with the generator and its discriminator in one model version.
"""

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import json
import sys


def parse_betas(text: str) -> tuple[float, float]:
    b1, b2 = (float(v) for v in text.split(","))
    return (b1, b2)


def main(argv=None):
    from fdrl.distributed.gan_worker import DATASETS, GenConfig
    from fdrl.distributed.trainer import RunFailed
    from fdrl.workflows.generators import train_generator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--model", choices=("gan", "vae"), default="gan")
    p.add_argument("--steps", type=int, default=10_000, help="generator updates (VAE: optimiser steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (gradients all-reduced)")
    p.add_argument("--batch", type=int, default=None, help="global batch (2D: 256, MNIST: 64)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (GAN: 1e-4 2D, 2e-4 MNIST; VAE 1e-3)")
    p.add_argument("--betas", default=None, help="Adam betas 'b1,b2' (GAN: 0.5,0.9 2D; 0.0,0.9 MNIST)")
    p.add_argument("--critic-steps", type=int, default=None, help="critic updates per generator update")
    p.add_argument("--gp-weight", type=float, default=10.0,
                   help="WGAN-GP penalty weight (DGflow: 10; Gulrajani et al.'s toy code: 0.1)")
    p.add_argument("--width", type=int, default=512, help="2D MLP hidden width")
    p.add_argument("--latent-dim", type=int, default=None, help="2D: 2; MNIST GAN 64; VAE 16")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--register-name", default="")
    p.add_argument("--experiment", default="fdrl-generators")
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--max-failures", type=int, default=2,
                   help="restarts from the last checkpoint after a lost worker")
    p.add_argument("--storage", default="", help="checkpoints (default: $FDRL_HOME/runs/generators)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="generator steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--run-name", default="", help="the run's folder under --storage")
    p.add_argument("--resume", action="store_true",
                   help="continue --run-name (default: the latest run of this model) from its last checkpoint")
    args = p.parse_args(argv)

    mnist, vae = args.dataset == "mnist", args.model == "vae"
    cfg = GenConfig(
        dataset=args.dataset, model=args.model, steps=args.steps, seed=args.seed, workers=args.workers,
        batch=args.batch or (64 if mnist else 256),
        lr=args.lr or (1e-3 if vae else 2e-4 if mnist else 1e-4),
        betas=parse_betas(args.betas) if args.betas else ((0.0, 0.9) if mnist else (0.5, 0.9)),
        critic_steps=args.critic_steps or (1 if mnist else 5),
        loss="hinge" if mnist else "wgan-gp", gp_weight=args.gp_weight, width=args.width,
        latent_dim=args.latent_dim or (16 if vae else 64 if mnist else 2), threads=args.threads,
        log_every=args.log_every, experiment=args.experiment, tracking_uri=args.tracking_uri,
        register_name=args.register_name, storage=args.storage, max_failures=args.max_failures,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        run_name=args.run_name, resume=args.resume)
    try:  # the config is validated before any worker starts
        out = train_generator(cfg)
    except (ValueError, FileExistsError, FileNotFoundError, RunFailed) as err:
        sys.exit(f"error: {err}")
    print(json.dumps({k: v for k, v in out.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
