"""The Ray Train worker: ``train_loop_per_worker`` runs on every worker and calls the core
``fdrl.core.step.train_step``. ``launch.run_training`` starts it.

* Each worker streams its own disjoint shards (``fdrl.data.stream.ShardStream``) and flows its own
  prior batch through the plain module. Only the update's backward all-reduces gradients (DDP:
  gloo or NCCL).
* Every ``checkpoint_every`` steps rank 0 writes model, EMA, optimizer, scheduler, step, config
  and every rank's RNG states and data position (gathered over the process group). Ray keeps it.
  A restart after a worker failure, and ``--resume``, continue from the latest one exactly.
* Rank 0 logs metrics and sample grids to MLflow. The launcher owns the run.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fdrl.distributed.checkpoint import load_checkpoint, save_checkpoint
from fdrl.config import TrainConfig
from fdrl.data.prefetch import BatchPrefetcher
from fdrl.data.source_prior import SourcePrior, check_domains
from fdrl.data.stream import ShardStream
from fdrl.data.manifest import open_shard_set
from fdrl.core.divergences import get_pairing
from fdrl.data.images import save_grid
from fdrl.core.networks import build_network
from fdrl.core.acceleration import compile_network, to_channels_last
from fdrl.core.priors import model_prior
from fdrl.core.flow import FlowSettings
from fdrl.core.sampler import sample
from fdrl.core.step import make_state, train_step

RUN_INFO = "fdrl_run.json"  # in the run directory: the MLflow run id, for --resume
MARKER_TIMEOUT_S = 300
GRID_SEED_OFFSET = 12345  # grids draw from their own seed, apart from the training stream


def _rank_state(generator: torch.Generator, batches: BatchPrefetcher, prior) -> dict:
    # The consumer's position (after the last batch trained on), not the prefetch thread's.
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
             "position": dict(batches.position)}
    if isinstance(prior, SourcePrior):  # translation: the source stream resumes like the data
        state["prior_position"] = prior.position
    return state


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def load_run_prior(cfg: TrainConfig, shape, rank: int = 0, world: int = 1,
                   position: dict | None = None):
    """The run's prior; for translation, this rank's stream over the source domain's shards."""
    if cfg.prior == "source":
        prior = SourcePrior.open(cfg.source, rank, world, cfg.seed, cfg.hflip, position)
        check_domains(prior.shape, shape)
        return prior
    return model_prior(cfg.prior, shape, cfg.prior_path or None)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from fdrl.tracking.tracker import Tracker

    cfg = TrainConfig.from_dict(config)
    _quiet_ray_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    device = ray.train.torch.get_device()
    run_dir = Path(cfg.storage) / cfg.run_name

    shard_set = open_shard_set(cfg.data)
    prior = None if cfg.prior == "source" else load_run_prior(cfg, shard_set.shape).to(device)
    pairing = get_pairing(cfg.pairing)
    flow = FlowSettings.from_config(cfg)

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
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)

    position = prior_position = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, rank_states = load_checkpoint(d, state, device)
        if len(rank_states) != world:
            raise ValueError(f"checkpoint was written by {len(rank_states)} workers, this run has "
                             f"{world}: resume with --workers {len(rank_states)}")
        mine = rank_states[rank]
        generator.set_state(mine["generator"])
        torch.set_rng_state(mine["torch"])
        position, prior_position = mine["position"], mine.get("prior_position")
        _console(f"[rank {rank}] resumed at step {state.step}, data position {position}")

    stream = ShardStream(shard_set, rank, world, cfg.seed, cfg.hflip, position)
    if cfg.prior == "source":
        prior = load_run_prior(cfg, shard_set.shape, rank, world, prior_position)
    # Decoding runs ahead on a thread (cfg.prefetch batches); a failing run's worker process
    # ends with its thread, a finished one closes it below.
    batches = BatchPrefetcher(stream, cfg.batch // world, cfg.prefetch)
    tracker = Tracker(cfg.experiment, run_id=cfg.mlflow_run_id or None,
                      tracking_uri=cfg.tracking_uri or None,
                      enabled=rank == 0 and bool(cfg.mlflow_run_id))

    evaluator = None
    if rank == 0 and cfg.eval_every:
        from fdrl.eval.evaluation import DomainKID

        evaluator = DomainKID(cfg.eval_classifier, shard_set, cfg.eval_samples, cfg.seed, device,
                              cfg.tracking_uri or None)
    last_kid = None
    fid_eval = _training_fid(cfg, device, world) if rank == 0 else None
    last_fid = None

    _mark(cfg, rank, "started")
    window_start, window_steps, window_wait = time.perf_counter(), 0, batches.wait_s
    while state.step < cfg.steps:
        step_start = time.perf_counter()
        data = next(batches).to(device)
        _maybe_inject_failure(cfg, state.step, run_dir)
        metrics = train_step(state, data, prior, pairing, flow, generator,
                             cfg.dequant, cfg.ema)
        window_steps += 1
        step = state.step
        final = step == cfg.steps
        if step % cfg.log_every and step % cfg.checkpoint_every and not final:
            continue
        elapsed = time.perf_counter() - window_start
        metrics.update(step=step, step_time=elapsed / window_steps,
                       images_per_s=window_steps * cfg.batch / elapsed,
                       last_step_time=time.perf_counter() - step_start,
                       data_wait_s=(batches.wait_s - window_wait) / window_steps,
                       skipped_samples=stream.stats.skipped)
        window_start, window_steps, window_wait = time.perf_counter(), 0, batches.wait_s
        if evaluator is not None and (step % cfg.eval_every == 0 or final or last_kid is None):
            last_kid = evaluator(state.ema, prior, pairing, flow)
        if last_kid is not None:
            metrics["kid"] = last_kid  # every report carries it, for ASHA
        if fid_eval is not None and fid_eval.due(step, final, last_fid is not None):
            last_fid = fid_eval(state.ema, prior, pairing, flow)
            metrics["fid_seconds"] = fid_eval.seconds
        if last_fid is not None:
            metrics["fid"] = last_fid
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)

        if step % cfg.sample_every == 0 or final:
            grid = _sample_grid(cfg, state, prior, pairing, flow, device, run_dir, rank)
            if grid is not None:
                tracker.log_artifact(grid, "samples")
        if final:  # before the last report: Tune may end the trial as soon as it sees it
            _mark(cfg, rank, "finished")
        if step % cfg.checkpoint_every == 0 or final:
            rank_states = _gather(_rank_state(generator, batches, prior), world)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(tmp, state, cfg.to_dict(), rank_states)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
        if rank == 0:
            _console(step_line(step, cfg.steps, metrics))
    batches.close()


def step_line(step: int, steps: int, metrics: dict) -> str:
    """The one console line per report: progress, loss, the KL diagnostic, speed and ETA."""
    eta = (steps - step) * metrics["step_time"]
    return (f"step {step}/{steps} loss {metrics['loss']:+.4f} log r data {metrics['log_r_data']:+.3f} "
            f"flowed {metrics['log_r_flowed']:+.3f} {metrics['images_per_s']:.1f} img/s "
            f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")


def _console(line: str) -> None:
    """Straight to stdout: Ray Train patches ``print`` into a logger, which shows each line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_ray_reports() -> None:
    """Ray Train logs every report of every rank ("Reporting training result N: ..."); rank 0's
    step line says what matters."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _training_fid(cfg: TrainConfig, device, world: int):
    if not cfg.fid:
        return None
    from fdrl.eval.training_fid import TrainingFID

    # On CPU rank 0 borrows the other ranks' threads: they wait at the next collective meanwhile.
    threads = cfg.threads * world if device.type == "cpu" else 0
    return TrainingFID(cfg.data, cfg.fid_samples, cfg.seed, cfg.fid_every, device,
                       cfg.fid_weights, cfg.fid_reference, threads)


def grid_samples(cfg: TrainConfig, net, prior, pairing, flow, device="cpu"):
    """The grid's EMA samples: K + kappa flow steps, the same seed at every step so grids compare."""
    return sample(net, pairing, flow, cfg.grid_size, cfg.seed + GRID_SEED_OFFSET, prior=prior,
                  device=device).x


def _sample_grid(cfg, state, prior, pairing, flow, device, run_dir, rank):
    if rank != 0:
        return None
    if cfg.prior == "source":  # the same source images every time, apart from the training stream
        prior = SourcePrior.open(cfg.source, 0, 1, cfg.seed + GRID_SEED_OFFSET)
    x = grid_samples(cfg, state.ema, prior, pairing, flow, device)
    return save_grid(x, run_dir / "samples" / f"step_{state.step:07d}.png")


def _mark(cfg: TrainConfig, rank: int, event: str) -> None:
    """Testing aid: rank 0 writes ``<marker_dir>/<run_name>.<event>``; a ``finished`` marker lists
    the ``started`` markers present then, so a test can tell runs overlapped without timing them."""
    if not cfg.marker_dir or rank != 0:
        return
    folder = Path(cfg.marker_dir)
    folder.mkdir(parents=True, exist_ok=True)
    seen = sorted(p.stem for p in folder.glob("*.started")) if event == "finished" else []
    (folder / f"{cfg.run_name}.{event}").write_text(json.dumps(seen))
    if event == "started" and cfg.marker_wait:
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        while len(list(folder.glob("*.started"))) < cfg.marker_wait:  # a condition, not a delay
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cfg.run_name}: only {len(list(folder.glob('*.started')))} of "
                                   f"{cfg.marker_wait} runs started within {MARKER_TIMEOUT_S} s")
            time.sleep(0.05)


def _maybe_inject_failure(cfg: TrainConfig, step: int, run_dir: Path) -> None:
    """Testing aid for FailureConfig: fail once at ``fail_at_step`` (a marker file makes it once)."""
    if step != cfg.fail_at_step:
        return
    marker = run_dir / f"injected_failure_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise RuntimeError(f"injected failure at step {step} (--fail-at-step)")
