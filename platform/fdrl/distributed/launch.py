"""The training launcher (driver side).

``resolve`` turns the user's config into the exact run (paths, run name, network, prior file,
tracking URI) without side effects; ``--dry-run`` prints it. ``check_run`` checks that run against
the data, the prior file, the storage and the cluster, on the driver, before any worker starts:
a configuration error is raised once, never retried by ``FailureConfig``. ``run_training`` then
fits the prior once per dataset, opens the MLflow run, starts a TorchTrainer over
``worker.train_loop_per_worker`` and registers the final EMA model.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from fdrl.config import TrainConfig, storage_root
from fdrl.data.manifest import manifest_hash, open_shard_set
from fdrl.distributed.worker import RUN_INFO, train_loop_per_worker

FITTED_PRIORS = ("full", "lowrank")


@dataclass(frozen=True)
class ResolvedRun:
    config: TrainConfig  # every path absolute, run name, network and prior path filled in
    run_dir: Path
    prior_to_fit: bool  # the data-dependent prior is not cached yet: the launcher fits it first
    shard_set: Any = field(repr=False, compare=False)  # the opened manifest; run_training reuses it

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return self.shard_set.shape

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "run_dir": str(self.run_dir),
                "data_shape": list(self.data_shape), "prior_to_fit": self.prior_to_fit}


@dataclass(frozen=True)
class RunResult:
    config: TrainConfig  # the resolved config the workers ran with
    run_dir: Path  # checkpoints, sample grids, fdrl_run.json
    checkpoint: Optional[str]  # the last checkpoint's directory
    mlflow_run_id: str  # empty when MLflow was unreachable
    model_uri: Optional[str]  # models:/NAME@candidate once registered
    wall_seconds: float
    used_gpu: bool  # what --gpu chose
    metrics: dict  # the last report

    @property
    def grids(self) -> list[Path]:
        return sorted((self.run_dir / "samples").glob("*.png"))


def prior_cache_path(cfg: TrainConfig, data: Path, storage: Path) -> Path:
    return storage / "priors" / f"{manifest_hash(data)[:16]}-{cfg.prior}-{cfg.prior_rank}.safetensors"


def _run_name(cfg: TrainConfig, storage: Path, now: datetime) -> str:
    if cfg.run_name:
        return cfg.run_name
    if cfg.resume:
        runs = sorted((p for p in storage.glob(f"{cfg.dataset}-*") if (p / RUN_INFO).exists()),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FileNotFoundError(f"--resume: no run of {cfg.dataset!r} under {storage}")
        return runs[-1].name
    return f"{cfg.dataset}-{now:%Y%m%d-%H%M%S}"


def resolve(cfg: TrainConfig, now: Optional[datetime] = None) -> ResolvedRun:
    """The fully resolved run of ``cfg``, which is left unchanged. Reads the manifest and lists
    the storage folder; writes nothing and starts nothing."""
    from fdrl.core.networks import NET_SIZES, generic_arch
    from fdrl.tracking.tracker import default_tracking_uri

    cfg = dataclasses.replace(cfg).validate()
    if not cfg.data:
        raise ValueError("--data PATH is required (a shard directory made by datasets/prepare.py)")
    shard_set = open_shard_set(cfg.data)  # a missing path fails here, on the driver, by name
    data = shard_set.root.resolve()
    storage = storage_root(cfg)
    arch = cfg.arch
    if arch == "auto":
        arch = generic_arch(shard_set.shape, cfg.net_widths or NET_SIZES[cfg.net_size])
    prior_path, to_fit = cfg.prior_path, False
    if prior_path:
        prior_path = str(Path(prior_path).expanduser().resolve())
    elif cfg.prior in FITTED_PRIORS:
        cached = prior_cache_path(cfg, data, storage)
        prior_path, to_fit = str(cached), not cached.exists()
    cfg = dataclasses.replace(cfg, dataset=cfg.dataset or data.name)
    run_name = _run_name(cfg, storage, now or datetime.now())
    resolved = dataclasses.replace(
        cfg, data=str(data), storage=str(storage), arch=arch, prior_path=prior_path,
        run_name=run_name, source=str(Path(cfg.source).resolve()) if cfg.source else "",
        # Resolved here: workers run in other directories, where the sqlite default would differ.
        tracking_uri=cfg.tracking_uri or default_tracking_uri())
    return ResolvedRun(resolved, storage / run_name, to_fit, shard_set)


def ensure_prior(cfg: TrainConfig, shard_set, storage: Path) -> str:
    """Fit the data-dependent prior once per dataset manifest; returns its path ('' if none)."""
    if cfg.prior_path or cfg.prior not in FITTED_PRIORS:
        return cfg.prior_path
    return _fit_prior(cfg, shard_set, prior_cache_path(cfg, shard_set.root, storage))


def _fit_prior(cfg: TrainConfig, shard_set, path: Path) -> str:
    if path.exists():
        print(f"prior: reusing {path}")
        return str(path)
    from fdrl.distributed.prior_fit import fit_prior_distributed

    prior, seconds = fit_prior_distributed(shard_set, cfg.prior, rank=cfg.prior_rank, seed=cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    prior.save(path)
    print(f"prior: fitted {cfg.prior} Gaussian on {prior.count} images in {seconds:.1f} s -> {path}")
    return str(path)


def prior_file_shape(path: str | Path) -> tuple[int, ...]:
    """The shape a prior file was fitted for, from its safetensors metadata (tensors not loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prior file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "shape" not in meta:
        raise ValueError(f"{path} is not a prior file (no shape in its metadata)")
    return tuple(json.loads(meta["shape"]))


def _same_shape(left: str, left_shape, right: str, right_shape, advice: str) -> None:
    if tuple(left_shape) != tuple(right_shape):
        raise ValueError(f"{left} shape {tuple(left_shape)} but {right} shape "
                         f"{tuple(right_shape)}: {advice}")


def check_run(run: ResolvedRun) -> None:
    """Configuration against data, prior file, evaluation inputs and storage (no cluster needed).
    Each error names both sides."""
    from fdrl.core.networks import network_input_shape

    cfg, shape = run.config, run.data_shape
    _same_shape(f"network {cfg.arch!r} takes images of", network_input_shape(cfg.arch),
                f"the data in {cfg.data} has", shape,
                "choose a network for this data (--arch auto builds one for its shape) or prepare "
                "the data at that shape")
    if cfg.prior_path and not run.prior_to_fit:
        _same_shape("prior has", prior_file_shape(cfg.prior_path), "the data has", shape,
                    f"fit a prior on this dataset (datasets/fit_prior.py), or drop --prior-path "
                    f"({cfg.prior_path})")
    if cfg.prior == "source":  # translation: the source domain's images must be the data's shape
        from fdrl.data.source_prior import check_domains

        check_domains(open_shard_set(cfg.source).shape, shape)
    if cfg.eval_every and not cfg.eval_classifier.startswith("models:/"):
        if not (Path(cfg.eval_classifier) / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"--eval-classifier {cfg.eval_classifier}: no model.safetensors there; "
                "train one with jobs/train_classifier.py or pass models:/NAME@ALIAS")
    info = run.run_dir / RUN_INFO
    if cfg.resume and info.exists():
        before = json.loads(info.read_text()).get("config", {})
        if before.get("workers", cfg.workers) != cfg.workers:
            raise ValueError(f"run {cfg.run_name} was trained by {before['workers']} workers, this "
                             f"resume asks for {cfg.workers}: resume with --workers {before['workers']} "
                             "(the data order and RNG states are per worker)")
    _check_writable(Path(cfg.storage))


def _check_writable(storage: Path) -> None:
    try:
        storage.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage, prefix=".fdrl-write-check-"):
            pass
    except OSError as err:
        raise PermissionError(f"storage {storage} is not writable ({err.strerror or err}): "
                              "pass a writable --storage or set FDRL_HOME") from None


def choose_gpu(setting: str, cluster_gpus: float) -> bool:
    """--gpu auto|on|off|wait against the GPUs the Ray cluster has now."""
    if setting == "off":
        return False
    if setting == "wait":  # the autoscaler adds GPU nodes when the workers ask for them
        return True
    if setting == "on" and cluster_gpus < 1:
        raise ValueError(
            "--gpu on, but the Ray cluster has no GPUs: run with --gpu auto or --gpu off, or, "
            "on a cluster that starts GPU nodes on demand (cluster.yaml), with --gpu wait")
    return cluster_gpus >= 1


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


def fit_tracked(trainer, tracker):
    """``trainer.fit()`` and its wall seconds; the MLflow run is marked FAILED if it raises."""
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    return result, time.perf_counter() - start


def run_training(cfg: TrainConfig, callbacks: Optional[list] = None) -> RunResult:
    """Resolve and check ``cfg`` (left unchanged), fit the prior if needed, open the MLflow run and
    train with a TorchTrainer. ``callbacks``: Ray Train user callbacks, e.g. Tune's report
    callback in a sweep trial."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fdrl.tracking.tracker import Tracker, git_commit

    run = resolve(cfg)
    check_run(run)
    cfg = run.config
    if not ray.is_initialized():
        ray.init()
    use_gpu = choose_gpu(cfg.gpu, ray.cluster_resources().get("GPU", 0))
    print(f"workers: {cfg.workers} x {'GPU (NCCL)' if use_gpu else 'CPU (gloo)'} (--gpu {cfg.gpu})")
    shard_set = run.shard_set
    if run.prior_to_fit:
        _fit_prior(cfg, shard_set, Path(cfg.prior_path))
    cfg = dataclasses.replace(cfg, fid_reference=ensure_fid_reference(cfg))
    info_path = run.run_dir / RUN_INFO
    previous = json.loads(info_path.read_text()) if cfg.resume and info_path.exists() else {}

    tracker = Tracker(cfg.experiment, run_name=cfg.run_name, tracking_uri=cfg.tracking_uri or None,
                      run_id=previous.get("mlflow_run_id"),
                      parent_run_id=cfg.mlflow_parent_run_id or None)
    cfg = dataclasses.replace(cfg, mlflow_run_id=tracker.run_id or "")
    if not previous:
        tracker.log_params(cfg.to_dict())
        tracker.set_tags({"dataset": cfg.dataset, "manifest_hash": manifest_hash(shard_set.root),
                          "git_commit": git_commit() or "unknown", "pairing": cfg.pairing,
                          "eta": cfg.eta, "flow_steps": cfg.flow_steps, "nu": cfg.nu, "lr": cfg.lr})
        if cfg.prior_path:
            tracker.log_artifact(cfg.prior_path, "prior")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps({"mlflow_run_id": cfg.mlflow_run_id, "config": cfg.to_dict()}, indent=1))

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cfg.worker_cpus or cfg.threads}),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=cfg.storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures), callbacks=callbacks),
    )
    result, seconds = fit_tracked(trainer, tracker)
    tracker.log_metrics({"train_wall_seconds": seconds}, cfg.steps)
    model_uri = None
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    if result.checkpoint is not None:
        tracker.set_tags({"checkpoint_uri": checkpoint})
        with result.checkpoint.as_directory() as d:
            tracker.log_artifact(d, "checkpoint")
            if tracker.run_id and cfg.register:  # MLflow reachable: register the EMA model (warns, never raises)
                from fdrl.tracking.registry import register_trained

                model_uri = register_trained(cfg, d)
    tracker.end("FINISHED")
    return RunResult(config=cfg, run_dir=run.run_dir, checkpoint=checkpoint,
                     mlflow_run_id=cfg.mlflow_run_id, model_uri=model_uri, wall_seconds=seconds, used_gpu=use_gpu,
                     metrics=dict(result.metrics or {}))
