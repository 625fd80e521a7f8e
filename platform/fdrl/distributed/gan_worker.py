"""Baseline generators on Ray Train: WGAN-GP (2D), SN-DCGAN (hinge) and a VAE on MNIST-5k.

``gan_loop_per_worker`` runs on every worker (``fdrl.workflows.generators`` launches it and
registers the result). Workers start from the same weights, draw their own batches (per-rank
seeds) and average gradients with an all-reduce between backward and the optimiser step; DDP is
not used because the gradient penalty needs a double backward. Metrics leave through
``ray.train.report`` only; the driver logs them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import ray.train
import torch
import torch.distributed as dist

from fdrl.core.gan import LOSSES, critic_loss, generator_loss, vae_loss
from fdrl.core.generator_nets import build_net

DATASETS = ("25gaussians", "swissroll", "mnist")


@dataclass
class GenConfig:
    dataset: str = "25gaussians"
    model: str = "gan"  # gan | vae (vae: MNIST only)
    steps: int = 10_000  # generator updates (VAE: optimiser steps)
    seed: int = 0
    workers: int = 1
    batch: int = 256  # global batch, split over workers
    lr: float = 1e-4
    betas: tuple = (0.5, 0.9)
    critic_steps: int = 5  # critic updates per generator update
    loss: str = "wgan-gp"
    width: int = 512  # 2D MLPs: hidden width (3 hidden ReLU layers)
    latent_dim: int = 2
    threads: int = 1
    log_every: int = 200
    max_failures: int = 2  # restarts after a lost worker (a diverging run fails at once)
    experiment: str = "fdrl-generators"
    tracking_uri: str = ""
    register_name: str = ""  # default gan-<dataset> / vae-<dataset>
    storage: str = ""  # where checkpoints go; empty: $FDRL_HOME/runs/generators (or ./runs/...)
    specs: dict = field(default_factory=dict)  # set by the launcher

    def validate(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        if self.model not in ("gan", "vae"):
            raise ValueError(f"unknown model {self.model!r}; valid: gan, vae")
        if self.model == "vae" and self.dataset != "mnist":
            raise ValueError("the VAE baseline is for mnist")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        for name in ("steps", "workers", "batch", "critic_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch % self.workers:
            raise ValueError(f"batch {self.batch} does not split over {self.workers} workers")


def net_specs(cfg: GenConfig) -> dict[str, dict]:
    if cfg.dataset != "mnist":
        mlp = dict(arch="mlp", width=cfg.width, depth=3)
        return {"generator": dict(mlp, in_dim=cfg.latent_dim, out_dim=2),
                "discriminator": dict(mlp, in_dim=2, out_dim=1)}
    if cfg.model == "vae":
        return {"generator": dict(arch="vae_dec", latent_dim=cfg.latent_dim),
                "encoder": dict(arch="vae_enc", latent_dim=cfg.latent_dim)}
    return {"generator": dict(arch="dcgan_g", latent_dim=cfg.latent_dim),
            "discriminator": dict(arch="dcgan_d")}


def load_data(dataset: str, seed: int) -> torch.Tensor:
    """The training pool: 100k 2D points (DGflow's recipe) or MNIST-5k as 1 x 32 x 32 in [-1, 1]."""
    if dataset == "mnist":
        from fdrl.data.readers import mnist_images

        return mnist_images()
    from fdrl.data.toy import make_toy

    return torch.from_numpy(make_toy(dataset, 100_000, seed))


def _average_grads(params, world: int) -> None:
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def gan_loop_per_worker(config: dict) -> None:
    cfg = GenConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    nets = {role: build_net(spec).train().requires_grad_(True) for role, spec in cfg.specs.items()}
    pool = load_data(cfg.dataset, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    per_rank = cfg.batch // world

    def data():
        return pool[torch.randint(len(pool), (per_rank,), generator=gen)]

    def latents():
        return torch.randn(per_rank, cfg.latent_dim, generator=gen)

    g = nets["generator"]
    if cfg.model == "vae":
        opt = torch.optim.Adam(list(g.parameters()) + list(nets["encoder"].parameters()), lr=cfg.lr)
    else:
        d = nets["discriminator"]
        opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        if cfg.model == "vae":
            loss = vae_loss(nets["encoder"], g, data(), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_grads(opt.param_groups[0]["params"], world)
            opt.step()
            metrics = {"loss": loss.item()}
        else:
            for _ in range(cfg.critic_steps):
                with torch.no_grad():
                    fake = g(latents())
                d_loss = critic_loss(cfg.loss, d, data(), fake, gen)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                _average_grads(d.parameters(), world)
                opt_d.step()
            g_loss = generator_loss(cfg.loss, d, g(latents()))
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            _average_grads(g.parameters(), world)
            opt_g.step()
            metrics = {"critic_loss": d_loss.item(), "generator_loss": g_loss.item()}
        if step % cfg.log_every == 0 and step != cfg.steps:
            ray.train.report({**metrics, "step": step, "seconds": time.perf_counter() - start})
    metrics.update(step=cfg.steps, seconds=time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            from safetensors.torch import save_file

            for role, net in nets.items():
                save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
                          f"{tmp}/{role}.safetensors")
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
