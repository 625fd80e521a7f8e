"""The Ray Train worker: ``train_loop_per_worker`` runs on every worker of a training run
(``fdrl.distributed.trainer`` starts it; ``fdrl.workflows.train`` prepares the run).

It reads top to bottom: set up, restore, loop.
* Each worker streams its own disjoint shards (``fdrl.data.stream``) and flows its own prior batch
  through the plain module; only the update's backward all-reduces gradients (DDP: gloo on CPU,
  NCCL on GPUs). The step is ``fdrl.core.step.train_step``.
* Every ``log_every`` steps the worker reports, in one place (``report``): rank 0 adds the
  evaluations (domain KID, standard FID) and writes the sample grid into the run folder; every
  ``checkpoint_every`` steps rank 0 also writes the checkpoint, with every rank's RNG states and
  data position gathered over the process group. ``ray.train.report`` carries the metrics and the
  checkpoint to the driver, which logs them to MLflow: the worker never talks to MLflow.
* A restart after a failure, and ``--resume``, continue from the newest valid checkpoint exactly.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

import ray.train
import ray.train.torch
import torch

from fdrl.config import TrainConfig
from fdrl.core.acceleration import compile_network, to_channels_last
from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.networks import build_network
from fdrl.core.priors import Prior, model_prior
from fdrl.core.sampler import sample
from fdrl.core.step import TrainState, make_state, train_step
from fdrl.data import storage
from fdrl.data.checkpoint import load_checkpoint, save_checkpoint
from fdrl.data.images import save_grid
from fdrl.data.manifest import ShardSet, open_shard_set
from fdrl.data.prefetch import BatchPrefetcher
from fdrl.data.source_prior import SourcePrior, check_domains
from fdrl.data.stream import ShardStream
from fdrl.distributed.trainer import gather, restore_newest_valid

GRID_SEED_OFFSET = 12345  # grids draw from their own seed, apart from the training stream


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config)
    _quiet_ray_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    device = ray.train.torch.get_device()

    # Set up: data, method, network (identical initial weights on every rank), RNG.
    shard_set = open_shard_set(cfg.data)
    pairing, flow = get_pairing(cfg.pairing), FlowSettings.from_config(cfg)
    state = build_state(cfg, device, world)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)

    # Restore: weights, optimizer, step, this rank's RNG states and data positions.
    positions = restore(cfg, state, generator, device, rank, world)
    stream = ShardStream(shard_set, rank, world, cfg.seed, cfg.hflip, positions.get("position"))
    # Decoding runs ahead on a thread (cfg.prefetch batches); the position saved in a checkpoint
    # is the consumer's, so resume is exact either way.
    batches = BatchPrefetcher(stream, cfg.batch // world, cfg.prefetch)
    prior = open_prior(cfg, shard_set.shape, rank, world, positions.get("prior_position"), device)
    evaluations = RankZeroEvaluations(cfg, shard_set, device, world) if rank == 0 else None

    # Loop: one step per batch, one report every log_every steps.
    clock = ReportClock(cfg.batch, batches, stream)
    while state.step < cfg.steps:
        data = next(batches).to(device)
        metrics = train_step(state, data, prior, pairing, flow, generator, cfg.dequant, cfg.ema)
        clock.tick()
        step = state.step
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == cfg.steps:
            report(cfg, state, {**metrics, **clock.lap(), "step": step}, evaluations,
                   lambda: rank_state(generator, batches, prior), world, prior, pairing, flow)
    batches.close()


def build_state(cfg: TrainConfig, device, world: int) -> TrainState:
    """The network (DDP-wrapped with several workers), Adam with its lr schedule, and the EMA."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    module = build_network(cfg.arch).to(device)
    if cfg.channels_last:
        module = to_channels_last(module)
    model = module
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    state = make_state(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.decay_steps, module=module)
    if cfg.compile:  # after make_state: the EMA is a deep copy of the plain network
        compile_network(module, device)
    return state


def restore(cfg: TrainConfig, state: TrainState, generator: torch.Generator, device, rank: int,
            world: int) -> dict:
    """Load the newest valid checkpoint of the run into ``state`` and ``generator``; returns this
    rank's saved state (its data and prior positions), or {} when the run starts fresh. A
    checkpoint that fails its sha256 check is skipped, with a warning, for the one before it."""
    rank_states = restore_newest_valid(storage.join(cfg.storage, cfg.run_name),
                                       lambda d: load_checkpoint(d, state, device)[1],
                                       lambda line: _console(f"[rank {rank}] {line}"))
    if rank_states is None:
        return {}
    if len(rank_states) != world:
        raise ValueError(f"checkpoint was written by {len(rank_states)} workers, this run has "
                         f"{world}: resume with --workers {len(rank_states)}")
    mine = rank_states[rank]
    generator.set_state(mine["generator"])
    torch.set_rng_state(mine["torch"])
    _console(f"[rank {rank}] resumed at step {state.step}, data position {mine['position']}")
    return mine


def open_prior(cfg: TrainConfig, shape, rank: int = 0, world: int = 1,
               position: Optional[dict] = None, device="cpu") -> Prior:
    """The run's prior: a fitted or parameter-free Gaussian, or, for translation, this rank's
    stream over the source domain's shards (resumed at ``position``)."""
    if cfg.prior == "source":
        prior = SourcePrior.open(cfg.source, rank, world, cfg.seed, cfg.hflip, position)
        check_domains(prior.shape, shape)
        return prior
    path = storage.node_copy(cfg.prior_path) if cfg.prior_path else None  # once per node
    return model_prior(cfg.prior, shape, path).to(device)


def rank_state(generator: torch.Generator, batches: BatchPrefetcher, prior: Prior) -> dict:
    """What this rank needs to resume exactly: RNG states and data positions (the consumer's,
    after the last batch trained on, not the prefetch thread's)."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
             "position": dict(batches.position)}
    if prior.position is not None:  # a prior that streams data resumes like the data
        state["prior_position"] = prior.position
    return state


def report(cfg: TrainConfig, state: TrainState, metrics: dict, evaluations, rank_state_now,
           world: int, prior: Prior, pairing, flow: FlowSettings) -> None:
    """The one place a worker reports: evaluations and the grid (rank 0), the checkpoint when due
    (every rank's state gathered to rank 0), then ``ray.train.report``."""
    step = state.step
    final = step == cfg.steps
    if evaluations is not None:
        metrics.update(evaluations(state, step, final, prior, pairing, flow))
    if step % cfg.checkpoint_every and not final:
        ray.train.report(metrics)
        return
    rank_states = gather(rank_state_now(), world)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if evaluations is not None:
            save_checkpoint(tmp, state, cfg.to_dict(), rank_states)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class RankZeroEvaluations:
    """What rank 0 adds to a report: the domain KID (``--eval-every``), the standard FID
    (``--fid``) and the EMA sample grid (``--sample-every``), each on its own schedule. The last
    KID and FID ride on every later report, so each report Tune sees carries them."""

    def __init__(self, cfg: TrainConfig, shard_set: ShardSet, device, world: int):
        self.cfg, self.device = cfg, device
        self.kid = self.fid = None
        self.last: dict[str, float] = {}
        if cfg.eval_every:
            from fdrl.eval.classifier import load_classifier
            from fdrl.eval.evaluation import DomainKID

            self.kid = DomainKID(load_classifier(storage.node_copy(cfg.eval_classifier)), shard_set,
                                 cfg.eval_samples, cfg.seed, device)
        if cfg.fid:
            from fdrl.eval.training_fid import TrainingFID

            # On CPU rank 0 borrows the other ranks' threads: they wait at the next collective.
            threads = cfg.threads * world if device.type == "cpu" else 0
            self.fid = TrainingFID(storage.node_copy(cfg.fid_reference), cfg.fid_samples, cfg.seed,
                                   cfg.fid_every, device, cfg.fid_weights, threads)

    def __call__(self, state: TrainState, step: int, final: bool, prior: Prior, pairing,
                 flow: FlowSettings) -> dict:
        cfg = self.cfg
        def fresh():  # every use starts from the same draws, apart from training's
            return prior.for_samples(cfg.seed + GRID_SEED_OFFSET)

        if self.kid is not None and (step % cfg.eval_every == 0 or final or "kid" not in self.last):
            self.last["kid"] = self.kid(state.ema, fresh(), pairing, flow)
        if self.fid is not None and self.fid.due(step, final, "fid" in self.last):
            self.last["fid"] = self.fid(state.ema, fresh(), pairing, flow)
            self.last["fid_seconds"] = self.fid.seconds
        if step % cfg.sample_every == 0 or final:
            x = grid_samples(cfg, state.ema, fresh(), pairing, flow, self.device)
            with tempfile.TemporaryDirectory() as tmp:  # into the run folder, wherever it is
                storage.put_file(save_grid(x, Path(tmp) / "grid.png"), grid_path(cfg, step))
        return dict(self.last)


def grid_samples(cfg: TrainConfig, net, prior, pairing, flow, device="cpu"):
    """The grid's EMA samples: K + kappa flow steps, the same seed at every step so grids compare."""
    return sample(net, pairing, flow, cfg.grid_size, cfg.seed + GRID_SEED_OFFSET, prior=prior,
                  device=device).x


def grid_path(cfg: TrainConfig, step: int) -> str:
    """Where the grid of ``step`` goes: <storage>/<run>/samples/step_NNNNNNN.png."""
    return storage.join(cfg.storage, cfg.run_name, "samples", f"step_{step:07d}.png")


class ReportClock:
    """Step time, images/s and data wait over the steps since the last report."""

    def __init__(self, batch: int, batches: BatchPrefetcher, stream: ShardStream):
        self.batch, self.batches, self.stream = batch, batches, stream
        self.start, self.steps, self.wait = time.perf_counter(), 0, batches.wait_s
        self.step_start = self.start

    def tick(self) -> None:
        self.steps += 1

    def lap(self) -> dict:
        now = time.perf_counter()
        elapsed = now - self.start
        out = {"step_time": elapsed / self.steps, "images_per_s": self.steps * self.batch / elapsed,
               "data_wait_s": (self.batches.wait_s - self.wait) / self.steps,
               "skipped_samples": self.stream.stats.skipped}
        self.start, self.steps, self.wait = now, 0, self.batches.wait_s
        return out


def _console(line: str) -> None:
    """Straight to stdout: Ray Train patches ``print`` into a logger, which shows each line twice."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_ray_reports() -> None:
    """Ray Train logs every report of every rank ("Reporting training result N: ..."); the
    driver's step line says what matters."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
