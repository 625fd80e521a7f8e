"""The training launcher (driver side): what every training job does.

``resolve`` turns the user's config into the exact run (paths, run name, network, prior file,
tracking URI) without side effects; ``--dry-run`` prints it. ``check_run`` checks that run against
the data, the prior file, the evaluation inputs and the storage before any worker starts, so a
configuration error is reported once and never retried. ``run_training`` takes that checked run:
it fits the prior once per dataset, prepares the FID reference and the evaluation classifier,
opens the MLflow run, trains (``fdrl.distributed.trainer``), logging every report of rank 0 and
printing its step line, and registers the final EMA model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

from fdrl.config import TrainConfig, storage_root
from fdrl.data import storage
from fdrl.data.manifest import ShardSet, manifest_hash, open_shard_set
from fdrl.env import home
from fdrl.workflows.priors import FITTED_PRIORS, ensure_prior, prior_cache_path

RUN_INFO = "fdrl_run.json"  # in the run folder: the MLflow run id and the config, for --resume
SPOOL_FOLDER = ".fdrl-spool"  # under $FDRL_HOME: each run's MLflow calls until the server has them
REGISTER_WAIT_S = 120  # how long a finished run waits for MLflow to come back to register


@dataclass(frozen=True)
class ResolvedRun:
    config: TrainConfig  # every path absolute (or a URI), run name, network, prior path filled in
    run_dir: str  # a folder or an object-store URI
    prior_to_fit: bool  # the data-dependent prior is not cached yet: the launcher fits it first
    shard_set: ShardSet = field(repr=False, compare=False)  # the opened manifest

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return self.shard_set.shape

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "run_dir": str(self.run_dir),
                "data_shape": list(self.data_shape), "prior_to_fit": self.prior_to_fit}


@dataclass(frozen=True)
class RunResult:
    config: TrainConfig  # the config the workers ran with
    run_dir: str  # checkpoints, sample grids, fdrl_run.json (a folder or an object-store URI)
    checkpoint: Optional[str]  # the last checkpoint's folder
    mlflow_run_id: str  # empty when MLflow was unreachable
    model_uri: Optional[str]  # models:/NAME@candidate once registered
    wall_seconds: float
    used_gpu: bool  # what --gpu chose
    metrics: dict  # the last report

    @property
    def grids(self) -> list[str]:
        return storage.glob(storage.join(self.run_dir, "samples"), "*.png")


# ------------------------------------------------------------------------------- resolve, check


def _run_name(cfg: TrainConfig, root: str, now: datetime) -> str:
    if cfg.run_name:
        return cfg.run_name
    if cfg.resume:  # the run whose run info was written last
        latest = storage.latest_folder(root, f"{cfg.dataset}-*", RUN_INFO)
        if latest is None:
            raise FileNotFoundError(f"--resume: no run of {cfg.dataset!r} under {root}")
        return latest
    return f"{cfg.dataset}-{now:%Y%m%d-%H%M%S}"


def resolve(cfg: TrainConfig, now: Optional[datetime] = None) -> ResolvedRun:
    """The fully resolved run of ``cfg``, which is left unchanged. Reads the manifest and lists
    the storage folder; writes nothing and starts nothing."""
    from fdrl.core.networks import NET_SIZES, generic_arch
    from fdrl.tracking.backend import default_tracking_uri

    cfg = dataclasses.replace(cfg).validate()
    if not cfg.data:
        raise ValueError("--data PATH is required (a shard directory made by datasets/prepare.py)")
    shard_set = open_shard_set(cfg.data)  # a missing path fails here, on the driver, by name
    root = storage_root(cfg)
    arch = cfg.arch
    if arch == "auto":
        arch = generic_arch(shard_set.shape, cfg.net_widths or NET_SIZES[cfg.net_size])
    prior_path, to_fit = cfg.prior_path, False
    if prior_path:
        prior_path = storage.resolve(prior_path)
    elif cfg.prior in FITTED_PRIORS:
        prior_path = prior_cache_path(cfg.prior, cfg.prior_rank, shard_set, root)
        to_fit = not storage.exists(prior_path)
    cfg = dataclasses.replace(cfg, dataset=cfg.dataset or storage.name(str(shard_set.root)))
    run_name = _run_name(cfg, root, now or datetime.now())
    resolved = dataclasses.replace(
        cfg, data=str(shard_set.root), storage=root, arch=arch, prior_path=prior_path,
        run_name=run_name, source=storage.resolve(cfg.source) if cfg.source else "",
        # Resolved here: workers run in other directories, where the sqlite default would differ.
        tracking_uri=cfg.tracking_uri or default_tracking_uri())
    return ResolvedRun(resolved, storage.join(root, run_name), to_fit, shard_set)


def prior_file_shape(path: str | Path) -> tuple[int, ...]:
    """The shape a prior file was fitted for, from its safetensors metadata (tensors not loaded)."""
    from safetensors import safe_open

    if not storage.is_file(path):
        raise FileNotFoundError(f"prior file not found: {path}")
    with safe_open(str(storage.node_copy(path)), framework="pt") as f:
        meta = f.metadata() or {}
    if "shape" not in meta:
        raise ValueError(f"{path} is not a prior file (no shape in its metadata)")
    return tuple(json.loads(meta["shape"]))


def same_shape(left: str, left_shape, right: str, right_shape, advice: str) -> None:
    """One error naming both sides when two shapes differ."""
    if tuple(left_shape) != tuple(right_shape):
        raise ValueError(f"{left} shape {tuple(left_shape)} but {right} shape "
                         f"{tuple(right_shape)}: {advice}")


def check_run(run: ResolvedRun) -> ResolvedRun:
    """The run against its data, prior file, evaluation inputs and storage (no cluster needed).
    Each error names both sides. Returns the run, which ``run_training`` then takes."""
    from fdrl.core.networks import network_input_shape

    cfg, shape = run.config, run.data_shape
    same_shape(f"network {cfg.arch!r} takes images of", network_input_shape(cfg.arch),
               f"the data in {cfg.data} has", shape,
               "choose a network for this data (--arch auto builds one for its shape) or prepare "
               "the data at that shape")
    if cfg.prior_path and not run.prior_to_fit:
        same_shape("prior has", prior_file_shape(cfg.prior_path), "the data has", shape,
                   f"fit a prior on this dataset (datasets/fit_prior.py), or drop --prior-path "
                   f"({cfg.prior_path})")
    if cfg.prior == "source":  # translation: the source domain's images must be the data's shape
        from fdrl.data.source_prior import check_domains

        check_domains(open_shard_set(cfg.source).shape, shape)
    if cfg.eval_every and not cfg.eval_classifier.startswith("models:/"):
        if not storage.is_file(storage.join(cfg.eval_classifier, "model.safetensors")):
            raise FileNotFoundError(
                f"--eval-classifier {cfg.eval_classifier}: no model.safetensors there; "
                "train one with jobs/train_classifier.py or pass models:/NAME@ALIAS")
    info = storage.join(run.run_dir, RUN_INFO)
    if cfg.resume and storage.is_file(info):
        before = json.loads(storage.read_text(info)).get("config", {})
        if before.get("workers", cfg.workers) != cfg.workers:
            raise ValueError(f"run {cfg.run_name} was trained by {before['workers']} workers, this "
                             f"resume asks for {cfg.workers}: resume with --workers {before['workers']} "
                             "(the data order and RNG states are per worker)")
    try:
        storage.check_writable(cfg.storage)
    except OSError as err:
        raise PermissionError(f"storage {cfg.storage} is not writable: {err}; pass a writable "
                              "--storage or set FDRL_HOME") from None
    check_tracking(cfg)
    return run


def check_tracking(cfg: TrainConfig) -> None:
    """This process can write runs to the tracking server, or the user said to start without it
    (--tracking-offline). Refused credentials always stop the run here."""
    from fdrl.tracking.runs import TrackingUnreachableError, check_access

    try:
        check_access(cfg.tracking_uri, cfg.experiment)
    except TrackingUnreachableError as err:
        if not cfg.tracking_offline:
            raise
        print(f"warning: {str(err).split(': start the server')[0]}: training starts anyway "
              "(--tracking-offline); its MLflow run is created, and everything logged replayed, "
              "once the server answers", flush=True)


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


# ------------------------------------------------------------------------------- inputs of a run


def ensure_fid_reference(cfg: TrainConfig) -> str:
    """With --fid: the reference statistics of fid_samples real images, computed once per
    dataset on Ray before the trainer starts (cached locally and in MLflow)."""
    if not cfg.fid or (cfg.fid_reference and storage.is_file(cfg.fid_reference)):
        return cfg.fid_reference
    from fdrl.workflows.standard_fid import ensure_reference

    path, source = ensure_reference(cfg.data, limit=cfg.fid_samples, workers=cfg.workers,
                                    weights=cfg.fid_weights or None, tracking_uri=cfg.tracking_uri,
                                    cache_dir=storage.join(cfg.storage, "fid_cache"))
    print(f"FID reference ({cfg.fid_samples} images): {source} -> {path}")
    return str(path)


def ensure_eval_classifier(cfg: TrainConfig) -> str:
    """--eval-classifier as a folder the workers read without MLflow: a registered classifier is
    verified against its sha256 tags and saved under the storage once per version."""
    if not cfg.eval_every:
        return cfg.eval_classifier
    from fdrl.tracking.classifiers import classifier_folder

    return classifier_folder(cfg.eval_classifier, storage.join(cfg.storage, "classifiers"),
                             cfg.tracking_uri)


# ------------------------------------------------------------------------------- the run itself


def step_line(step: int, steps: int, metrics: dict) -> str:
    """The one console line per report: progress, loss, the KL diagnostic, speed and ETA."""
    eta = (steps - step) * metrics["step_time"]
    return (f"step {step}/{steps} loss {metrics['loss']:+.4f} log r data {metrics['log_r_data']:+.3f} "
            f"flowed {metrics['log_r_flowed']:+.3f} {metrics['images_per_s']:.1f} img/s "
            f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")


class Reports:
    """Each report of rank 0, on the driver: its metrics and its sample grid to MLflow, its step
    line to the console."""

    def __init__(self, cfg: TrainConfig, run_dir: str, tracker):
        self.cfg, self.run_dir, self.tracker = cfg, run_dir, tracker
        self.last: dict = {}

    def __call__(self, metrics: dict, checkpoint: Optional[str]) -> None:
        step = int(metrics["step"])
        self.last = metrics
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if step % self.cfg.sample_every == 0 or step == self.cfg.steps:
            grid = storage.join(self.run_dir, "samples", f"step_{step:07d}.png")
            if storage.is_file(grid):  # the tracker copies it into its spool at once
                self.tracker.log_artifact(storage.node_copy(grid), "samples")
        print(step_line(step, self.cfg.steps, metrics), flush=True)


def write_run_info(path: str, tracker, cfg: TrainConfig) -> None:
    """fdrl_run.json: the MLflow run (once it exists) and its spool, for --resume, and the config.
    Written atomically (fsynced temp file, rename; one PUT on an object store)."""
    storage.write_text(path, json.dumps({"mlflow_run_id": tracker.run_id or "",
                                         "spool": str(tracker.spool_dir or ""),
                                         "config": cfg.to_dict()}, indent=1))


def _register(cfg: TrainConfig, tracker, checkpoint_dir) -> Optional[str]:
    """Register the final model once its MLflow run exists: a run started while the server was
    down is created when it comes back, so wait for that (bounded) before giving up."""
    from fdrl.tracking.registry import register_trained

    run_id = tracker.wait_for_run(REGISTER_WAIT_S)
    if run_id is None:
        print(f"warning: MLflow at {cfg.tracking_uri} stayed unreachable for {REGISTER_WAIT_S} s: "
              f"the model is not registered; the metrics wait in {tracker.spool_dir}. Register "
              f"later with jobs/register.py --checkpoint <final checkpoint> --name "
              f"{cfg.register_name or 'fdrl-' + cfg.dataset}", flush=True)
        return None
    return register_trained(cfg, run_id, checkpoint_dir)  # warns, never raises


def _checkpoint_uri(root: str, checkpoint) -> Optional[str]:
    """Ray's checkpoint path, with the scheme of the storage it is on (Ray keeps the path inside
    its filesystem: ``bucket/prefix/...``)."""
    if checkpoint is None:
        return None
    if storage.is_uri(root):
        return f"{root.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def run_training(run: ResolvedRun, callbacks: Optional[list] = None,
                 train_loop: Optional[Callable[[dict], None]] = None) -> RunResult:
    """Train the run ``check_run`` passed. ``callbacks``: more Ray Train callbacks (Tune's report
    callback in a sweep trial); ``train_loop``: the per-worker function (tests wrap it)."""
    from fdrl.distributed.cluster import gpu_count
    from fdrl.distributed.train_worker import train_loop_per_worker
    from fdrl.distributed.trainer import RunFailed, TrainerSpec, fit
    from fdrl.tracking.tracker import Tracker, git_commit

    cfg = run.config
    use_gpu = choose_gpu(cfg.gpu, gpu_count())
    print(f"workers: {cfg.workers} x {'GPU (NCCL)' if use_gpu else 'CPU (gloo)'} (--gpu {cfg.gpu})")
    if run.prior_to_fit:
        ensure_prior(cfg.prior, cfg.prior_rank, cfg.seed, run.shard_set, cfg.prior_path)
    cfg = dataclasses.replace(cfg, fid_reference=ensure_fid_reference(cfg),
                              eval_classifier=ensure_eval_classifier(cfg))
    info_path = storage.join(run.run_dir, RUN_INFO)
    previous = json.loads(storage.read_text(info_path)) if cfg.resume and storage.is_file(info_path) else {}
    # MLflow calls go through a spool on this machine's disk, replayed in order whenever the
    # server answers; a resumed run reopens its spool (or its run, from another machine).
    storage_key = hashlib.sha256(cfg.storage.encode()).hexdigest()[:12]
    spool = home() / SPOOL_FOLDER / f"{cfg.run_name}-{storage_key}"
    tracker = Tracker(cfg.experiment, run_name=cfg.run_name, tracking_uri=cfg.tracking_uri or None,
                      run_id=previous.get("mlflow_run_id") or None,
                      parent_run_id=cfg.mlflow_parent_run_id or None, spool_dir=spool)
    if not previous:
        tracker.log_params(cfg.to_dict())
        tracker.set_tags({"dataset": cfg.dataset, "manifest_hash": manifest_hash(run.shard_set.root),
                          "git_commit": git_commit() or "unknown", "pairing": cfg.pairing,
                          "eta": cfg.eta, "flow_steps": cfg.flow_steps, "nu": cfg.nu, "lr": cfg.lr})
        if cfg.prior_path:
            tracker.log_artifact(storage.node_copy(cfg.prior_path), "prior")
    write_run_info(info_path, tracker, cfg)

    reports = Reports(cfg, run.run_dir, tracker)
    spec = TrainerSpec(train_loop or train_loop_per_worker, cfg.to_dict(), cfg.run_name,
                       cfg.storage, cfg.workers, use_gpu, cfg.worker_cpus or cfg.threads,
                       cfg.keep_checkpoints, cfg.max_failures, list(callbacks or []))
    start = time.perf_counter()
    try:
        result = fit(spec, reports, on_retry=lambda attempt, why: print(
            f"restarting from the last checkpoint ({attempt}/{cfg.max_failures}): {why}", flush=True))
    except RunFailed as err:
        tracker.set_tags({"fdrl.failure": str(err)})
        tracker.end("FAILED")
        raise
    except BaseException as err:
        tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    seconds = time.perf_counter() - start
    tracker.log_metrics({"train_wall_seconds": seconds}, cfg.steps)
    model_uri = None
    checkpoint = _checkpoint_uri(cfg.storage, result.checkpoint)
    if result.checkpoint is not None:
        tracker.set_tags({"checkpoint_uri": checkpoint})
        with result.checkpoint.as_directory() as d:
            tracker.log_artifact(d, "checkpoint")
            if cfg.register:
                model_uri = _register(cfg, tracker, d)
    tracker.end("FINISHED")
    write_run_info(info_path, tracker, cfg)
    return RunResult(config=cfg, run_dir=run.run_dir, checkpoint=checkpoint,
                     mlflow_run_id=tracker.run_id or "", model_uri=model_uri, wall_seconds=seconds,
                     used_gpu=use_gpu, metrics=dict(reports.last or result.metrics or {}))
