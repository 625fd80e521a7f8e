"""The training launcher (driver side): fit the prior once per dataset, open the MLflow run, start
a TorchTrainer over ``worker.train_loop_per_worker``, register the final EMA model."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from fdrl.config import TrainConfig
from fdrl.data.manifest import open_shard_set
from fdrl.distributed.worker import RUN_INFO, load_run_prior, train_loop_per_worker
from fdrl.core.priors import check_prior_shape


def _resolve_run_name(cfg: TrainConfig, storage: Path) -> str:
    if cfg.run_name:
        return cfg.run_name
    if cfg.resume:
        runs = sorted((p for p in storage.glob(f"{cfg.dataset}-*") if (p / RUN_INFO).exists()),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FileNotFoundError(f"--resume: no run of {cfg.dataset!r} under {storage}")
        return runs[-1].name
    return f"{cfg.dataset}-{datetime.now():%Y%m%d-%H%M%S}"


def ensure_prior(cfg: TrainConfig, shard_set, storage: Path) -> str:
    """Fit the data-dependent prior once per dataset manifest; returns its path ('' if none)."""
    if cfg.prior_path or cfg.prior not in ("full", "lowrank"):
        return cfg.prior_path
    from fdrl.distributed.prior_fit import fit_prior_distributed
    from fdrl.data.manifest import manifest_hash

    path = storage / "priors" / f"{manifest_hash(shard_set.root)[:16]}-{cfg.prior}-{cfg.prior_rank}.safetensors"
    if path.exists():
        print(f"prior: reusing {path}")
        return str(path)
    prior, seconds = fit_prior_distributed(shard_set, cfg.prior, rank=cfg.prior_rank, seed=cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    prior.save(path)
    print(f"prior: fitted {cfg.prior} Gaussian on {prior.count} images in {seconds:.1f} s -> {path}")
    return str(path)


def ensure_fid_reference(cfg: TrainConfig) -> str:
    """With --fid: the reference statistics of fid_samples real images, computed once per
    dataset on Ray before the trainer starts (cached locally and in MLflow)."""
    if not cfg.fid or (cfg.fid_reference and Path(cfg.fid_reference).is_file()):
        return cfg.fid_reference
    from fdrl.distributed.fid import ensure_reference

    path, source = ensure_reference(cfg.data, limit=cfg.fid_samples, workers=cfg.workers,
                                    weights=cfg.fid_weights or None, tracking_uri=cfg.tracking_uri,
                                    cache_dir=Path(cfg.storage) / "fid_cache")
    print(f"FID reference ({cfg.fid_samples} images): {source} -> {path}")
    return str(path)


def run_training(cfg: TrainConfig, callbacks: Optional[list] = None):
    """Fit the prior if needed, open the MLflow run, train with a TorchTrainer; returns the Result.
    ``callbacks``: Ray Train user callbacks, e.g. Tune's report callback in a sweep trial."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fdrl.data.manifest import manifest_hash
    from fdrl.tracking.tracker import Tracker, default_tracking_uri, git_commit

    cfg.validate()
    # Resolved here: workers run in other directories, where the sqlite default would differ.
    cfg.tracking_uri = cfg.tracking_uri or default_tracking_uri()
    shard_set = open_shard_set(cfg.data)  # a missing path fails here, on the driver, by name
    storage = Path(cfg.storage).resolve()
    cfg.storage = str(storage)
    cfg.data = str(Path(cfg.data).resolve())
    if not ray.is_initialized():
        ray.init()
    cfg.prior_path = ensure_prior(cfg, shard_set, storage)
    check_prior_shape(load_run_prior(cfg, shard_set.shape), shard_set.shape)
    cfg.fid_reference = ensure_fid_reference(cfg)
    cfg.run_name = _resolve_run_name(cfg, storage)
    run_dir = storage / cfg.run_name
    info_path = run_dir / RUN_INFO
    previous = json.loads(info_path.read_text()) if cfg.resume and info_path.exists() else {}

    tracker = Tracker(cfg.experiment, run_name=cfg.run_name, tracking_uri=cfg.tracking_uri or None,
                      run_id=previous.get("mlflow_run_id"),
                      parent_run_id=cfg.mlflow_parent_run_id or None)
    cfg.mlflow_run_id = tracker.run_id or ""
    if not previous:
        tracker.log_params(cfg.to_dict())
        tracker.set_tags({"dataset": cfg.dataset, "manifest_hash": manifest_hash(shard_set.root),
                          "git_commit": git_commit() or "unknown", "pairing": cfg.pairing,
                          "eta": cfg.eta, "flow_steps": cfg.flow_steps, "nu": cfg.nu, "lr": cfg.lr})
        if cfg.prior_path:
            tracker.log_artifact(cfg.prior_path, "prior")
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps({"mlflow_run_id": cfg.mlflow_run_id, "config": cfg.to_dict()}, indent=1))

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker=None if cfg.gpu else {"CPU": cfg.worker_cpus or cfg.threads}),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures), callbacks=callbacks),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    seconds = time.perf_counter() - start
    tracker.log_metrics({"train_wall_seconds": seconds}, cfg.steps)
    result.fdrl_model_uri = None  # models:/NAME@candidate once registered
    if result.checkpoint is not None:
        tracker.set_tags({"checkpoint_uri": result.checkpoint.path})
        with result.checkpoint.as_directory() as d:
            tracker.log_artifact(d, "checkpoint")
            if tracker.run_id and cfg.register:  # MLflow reachable: register the EMA model (warns, never raises)
                from fdrl.tracking.registry import register_trained

                result.fdrl_model_uri = register_trained(cfg, d)
    tracker.end("FINISHED")
    result.fdrl_wall_seconds = seconds
    result.fdrl_run_dir = run_dir
    result.fdrl_config = cfg
    return result
