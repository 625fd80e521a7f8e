"""Baseline generators on Ray Train: WGAN-GP (2D), SN-DCGAN (hinge) and a VAE on MNIST-5k.

``gan_loop_per_worker`` runs on every worker (``fdrl.workflows.generators`` launches it and
registers the result). Workers start from the same weights, draw their own batches (per-rank
seeds) and average gradients with an all-reduce between backward and the optimiser step; DDP is
not used because the gradient penalty needs a double backward. Metrics leave through
``ray.train.report`` only; the driver logs them.

Every ``checkpoint_every`` generator steps the workers report a checkpoint (nets, optimisers, step,
every rank's RNG states), so a restart after a lost worker, or a new job with ``resume``, continues
the same random stream and ends at the weights of an uninterrupted run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field

import ray.train
import torch
import torch.distributed as dist

from fdrl.config import check_model_name
from fdrl.core.gan import LOSSES, critic_loss, generator_loss, vae_loss
from fdrl.core.generator_nets import build_net
from fdrl.data import storage
from fdrl.data.checkpoint import MANIFEST, CorruptCheckpointError, verify_checkpoint, write_manifest
from fdrl.distributed.trainer import gather, restore_newest_valid

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
    gp_weight: float = 10.0  # WGAN-GP penalty weight (DGflow: 10; Gulrajani et al.'s toy code: 0.1)
    width: int = 512  # 2D MLPs: hidden width (3 hidden ReLU layers)
    latent_dim: int = 2
    threads: int = 1
    log_every: int = 200
    max_failures: int = 2  # restarts after a lost worker (a diverging run fails at once)
    experiment: str = "fdrl-generators"
    tracking_uri: str = ""
    register_name: str = ""  # default gan-<dataset> / vae-<dataset>
    storage: str = ""  # where checkpoints go; empty: $FDRL_HOME/runs/generators (the launcher resolves it)
    checkpoint_every: int = 1000  # generator steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    run_name: str = ""  # the run's folder under storage; default <name>-s<seed>-<time>
    resume: bool = False  # continue run_name (or the latest run of this model) from its checkpoint
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
        check_model_name(self.register_name)
        if self.checkpoint_every < 0 or self.gp_weight < 0 or self.keep_checkpoints < 1:
            raise ValueError(f"checkpoint_every and gp_weight must be >= 0 and keep_checkpoints >= 1, "
                             f"got {self.checkpoint_every}, {self.gp_weight}, {self.keep_checkpoints}")
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
        opts = {"vae": torch.optim.Adam(list(g.parameters()) + list(nets["encoder"].parameters()),
                                        lr=cfg.lr)}
    else:
        d = nets["discriminator"]
        opts = {"critic": torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)),
                "generator": torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))}
    first, before = restore(cfg, nets, opts, gen, rank, world)
    start = time.perf_counter() - before
    if first > cfg.steps:  # resumed from the final checkpoint: report it again as the result
        report(nets, opts, gen, cfg.steps, {"seconds": before}, rank, world)
        return
    for step in range(first, cfg.steps + 1):
        if cfg.model == "vae":
            loss = vae_loss(nets["encoder"], g, data(), gen)
            opts["vae"].zero_grad(set_to_none=True)
            loss.backward()
            _average_grads(opts["vae"].param_groups[0]["params"], world)
            opts["vae"].step()
            metrics = {"loss": loss.item()}
        else:
            for _ in range(cfg.critic_steps):
                with torch.no_grad():
                    fake = g(latents())
                d_loss = critic_loss(cfg.loss, d, data(), fake, gen, cfg.gp_weight)
                opts["critic"].zero_grad(set_to_none=True)
                d_loss.backward()
                _average_grads(d.parameters(), world)
                opts["critic"].step()
            g_loss = generator_loss(cfg.loss, d, g(latents()))
            opts["generator"].zero_grad(set_to_none=True)
            g_loss.backward()
            _average_grads(g.parameters(), world)
            opts["generator"].step()
            metrics = {"critic_loss": d_loss.item(), "generator_loss": g_loss.item()}
        metrics["seconds"] = time.perf_counter() - start
        if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            report(nets, opts, gen, step, metrics, rank, world)
        elif step % cfg.log_every == 0:
            ray.train.report({**metrics, "step": step})


def report(nets, opts, gen, step, metrics, rank, world) -> None:
    """Report ``metrics`` with a checkpoint (``save_checkpoint``) holding every rank's RNG states
    (gathered to rank 0), so that a restart continues the same stream."""
    ranks = gather({"generator": gen.get_state(), "torch": torch.get_rng_state()}, world)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_checkpoint(tmp, nets, {"optimizers": {k: o.state_dict() for k, o in opts.items()},
                                        "step": step, "seconds": metrics.get("seconds", 0.0),
                                        "rank_states": ranks})
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "step": step}, checkpoint=ckpt)


def checkpoint_files(nets) -> list[str]:
    return [f"{role}.safetensors" for role in nets] + ["state.pt"]


def save_checkpoint(folder: str, nets, state: dict) -> None:
    """The nets' weights (safetensors), ``state`` (optimisers, step, ...; ``torch.load``-safe) and,
    written last to mark the checkpoint complete, the sha256 manifest of ``fdrl.data.checkpoint``."""
    from safetensors.torch import save_file

    for role, net in nets.items():
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
                  f"{folder}/{role}.safetensors")
    torch.save(state, f"{folder}/state.pt")
    write_manifest(folder, state["step"], checkpoint_files(nets))


def load_checkpoint(ckpt_dir: str, nets) -> dict:
    """Verify the manifest, load the nets in place; returns the state blob. A checkpoint of an
    earlier release has no manifest at all: it counts if every file loads."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load() -> dict:
        for role, net in nets.items():
            net.load_state_dict(load_file(f"{ckpt_dir}/{role}.safetensors"))
        return torch.load(f"{ckpt_dir}/state.pt", weights_only=True)

    if os.path.exists(os.path.join(ckpt_dir, MANIFEST)):
        verify_checkpoint(ckpt_dir, checkpoint_files(nets))
        return load()
    try:
        return load()
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError) as err:
        raise CorruptCheckpointError(f"checkpoint {ckpt_dir} (no manifest) does not load: {err}") from None


def restore(cfg: GenConfig, nets, opts, gen, rank, world) -> tuple[int, float]:
    """Load the run's newest valid checkpoint in place, if any (one that fails its sha256 check is
    skipped for the one before it); returns (the first step to run, the seconds trained before it)."""
    blob = restore_newest_valid(storage.join(cfg.storage, cfg.run_name),
                                lambda d: load_checkpoint(d, nets),
                                lambda line: print(f"[rank {rank}] {line}", flush=True))
    if blob is None:
        return 1, 0.0
    if len(blob["rank_states"]) != world:
        raise ValueError(f"checkpoint was written by {len(blob['rank_states'])} workers, this run "
                         f"has {world}: resume with --workers {len(blob['rank_states'])}")
    for k, o in opts.items():
        o.load_state_dict(blob["optimizers"][k])
    gen.set_state(blob["rank_states"][rank]["generator"])
    torch.set_rng_state(blob["rank_states"][rank]["torch"])
    return int(blob["step"]) + 1, float(blob["seconds"])
