"""The training config: one flat, JSON-serialisable dataclass. It travels to every Ray worker,
into every checkpoint and into MLflow params, and is enough to rebuild the model on its own.
Defaults are the FDRL paper's (appendix F); jobs/ presets override a few fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    # data
    data: str = ""  # shard directory with manifest.parquet
    dataset: str = "custom"  # name used for runs and the registry
    hflip: bool = True  # random horizontal flip
    dequant: float = 0.03  # std of the dequantisation noise added to data (pixels in [-1, 1])
    # model and method
    arch: str = "cifar10"  # networks.ARCHITECTURES key
    pairing: str = "lsif-chi2"  # lsif-chi2 | lr-kl | lr-js | lr-logd
    prior: str = "full"  # uniform | gaussian | full | lowrank
    prior_path: str = ""  # fitted prior (.safetensors); empty: fit it before training
    prior_rank: int = 512  # components of the low-rank prior
    # optimisation
    steps: int = 100_000  # training steps
    batch: int = 64  # global batch; each worker takes batch / workers
    lr: float = 1e-4  # Adam learning rate
    beta1: float = 0.9
    beta2: float = 0.999
    decay_steps: list = field(default_factory=lambda: [80_000, 90_000])  # lr x 0.1 at these steps
    ema: float = 0.998  # EMA decay m
    # flow
    flow_steps: int = 100  # K, flow steps per training step
    extra_steps: int = 20  # kappa, extra flow steps when sampling (20 data prior, 10 uniform)
    eta: float = 3.0  # flow step size
    nu: float = 0.01  # flow noise scale
    # platform
    workers: int = 2  # Ray Train workers (one GPU each with --gpu)
    gpu: bool = False  # NCCL on GPUs; otherwise gloo on CPU
    threads: int = 1  # torch threads per CPU worker
    worker_cpus: float = 0.0  # CPUs each CPU worker reserves (0: threads); sweeps leave room for trial drivers
    seed: int = 0
    log_every: int = 10  # steps between metric reports
    checkpoint_every: int = 1000  # steps between checkpoints
    sample_every: int = 1000  # steps between EMA sample grids (K + kappa steps)
    grid_size: int = 64  # samples in a grid
    keep_checkpoints: int = 3
    max_failures: int = 2  # automatic restarts after a worker failure
    storage: str = "runs"  # Ray Train storage path (checkpoints, grids)
    run_name: str = ""  # empty: <dataset>-<timestamp>
    resume: bool = False  # continue run_name (or the latest run) from its last checkpoint
    experiment: str = "fdrl"  # MLflow experiment
    register: bool = True  # register the final EMA model (sweeps register only their best trial)
    register_name: str = ""  # registered model name for the final checkpoint; empty: fdrl-<dataset>
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI or sqlite under the working directory
    fail_at_step: int = -1  # testing aid: worker raises once at this step (fault tolerance)
    marker_dir: str = ""  # testing aid: rank 0 marks loop start and, at the end, the starts it saw
    marker_wait: int = 0  # testing aid: rank 0 waits until this many runs marked their start
    mlflow_run_id: str = ""  # set by the launcher; rank 0 logs into this run
    mlflow_parent_run_id: str = ""  # set by sweeps: the trial's run is nested under the sweep's
    eval_every: int = 0  # steps between domain-feature KID evaluations, at report steps (0: off)
    eval_samples: int = 256  # EMA samples and real images per KID evaluation
    eval_classifier: str = ""  # feature classifier: a folder or models:/NAME@ALIAS
    # Standard FID of EMA samples (fdrl.eval.training_fid), computed by rank 0 and logged as
    # metric "fid". Off here, so library and test configs stay fast; the jobs' presets turn it on.
    fid: bool = False  # FID at the end of the run (and every fid_every steps)
    fid_every: int = 0  # steps between FIDs, at report steps (0: only at the end)
    fid_samples: int = 256  # EMA samples, and real images in the reference: FID-N, not FID-50k
    fid_weights: str = ""  # Inception weights file; empty: $FDRL_FID_WEIGHTS or the pinned packaged one
    fid_reference: str = ""  # set by the launcher: the cached reference statistics file

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def validate(self) -> "TrainConfig":
        from fdrl.core.divergences import get_pairing
        from fdrl.core.flow import FlowSettings

        get_pairing(self.pairing)
        FlowSettings.from_config(self)
        if self.prior not in ("uniform", "gaussian", "full", "lowrank"):
            raise ValueError(f"unknown prior {self.prior!r}; valid: uniform, gaussian, full, lowrank")
        if self.workers < 1 or self.batch % self.workers:
            raise ValueError(f"batch {self.batch} must split evenly over {self.workers} workers")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        return self


def add_config_args(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """One --flag per field (underscores become dashes), defaulting to the preset's values."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"(default: {json.dumps(value)})"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        elif isinstance(value, list):
            parser.add_argument(flag, type=int, nargs="*", default=value, help=help_text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
