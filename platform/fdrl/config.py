"""The training config: one flat, JSON-serialisable dataclass. It travels to every Ray worker,
into every checkpoint and into MLflow params, and is enough to rebuild the model on its own.
Defaults are the FDRL paper's (appendix F); jobs/ presets override a few fields."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any

# Set by the launcher or sweeps through the config object; never command-line flags.
INTERNAL_FIELDS = frozenset({"mlflow_parent_run_id", "fid_reference"})
# Fields of older versions, ignored when an old config (a checkpoint's, a registered model's) is read.
RETIRED_FIELDS = frozenset({"mlflow_run_id", "fail_at_step", "marker_dir", "marker_wait"})
GPU_CHOICES = ("auto", "on", "off", "wait")


@dataclass
class TrainConfig:
    # data
    data: str = ""  # shard directory with manifest.parquet (made by datasets/prepare.py)
    dataset: str = ""  # name of runs (<dataset>-<time>) and of the model (fdrl-<dataset>); empty: the data folder's name
    hflip: bool = True  # random horizontal flip (turn off for images that are not mirror-symmetric: digits, text)
    dequant: float = 0.03  # std of the dequantisation noise added to data (pixels in [-1, 1])
    # model and method
    arch: str = "cifar10"  # network: a paper preset (cifar10, celeba64, church128, cat2dog64, mnist32), or auto: built for the data's shape
    net_size: str = "s"  # size of an auto network: s (~0.17M parameters), m (~0.7M), l (~2.8M)
    net_widths: list = field(default_factory=list)  # channels per stage of an auto network (overrides --net-size), e.g. 32 64 128
    pairing: str = "lsif-chi2"  # lsif-chi2 | lr-kl | lr-js | lr-logd
    prior: str = "full"  # uniform | gaussian | full | lowrank | source (translation: see `source`)
    source: str = ""  # translation: source-domain shard directory, streamed as the prior (prior "source")
    prior_path: str = ""  # fitted prior (.safetensors); empty: fit it before training
    prior_rank: int = 512  # components of the low-rank prior
    # optimisation
    steps: int = 100_000  # training steps
    batch: int = 64  # global batch; each worker takes batch / workers
    lr: float = 1e-4  # Adam learning rate
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    decay_steps: list = field(default_factory=lambda: [80_000, 90_000])  # lr x 0.1 at these steps
    ema: float = 0.998  # EMA decay m
    # flow
    flow_steps: int = 100  # K, flow steps per training step
    extra_steps: int = 20  # kappa, extra flow steps when sampling (20 data prior, 10 uniform)
    eta: float = 3.0  # flow step size
    nu: float = 0.01  # flow noise scale
    flow_bound: float = 0.0  # > 0: flowed samples are clamped to [-bound, bound] each step (0: off)
    # speed (fdrl.core.precision, fdrl.core.acceleration)
    precision: str = "fp32"  # fp32 | bf16: bf16 autocast for the network in the flow and the loss
    channels_last: bool = False  # NHWC conv weights (fast path of oneDNN and cuDNN)
    compile: bool = False  # torch.compile the network (falls back to eager with one warning)
    prefetch: int = 0  # batches decoded ahead on a background thread per worker (0: inline)
    # platform
    workers: int = 2  # Ray Train workers (one GPU each on GPUs)
    gpu: str = "auto"  # auto: GPUs (NCCL) when the cluster has them now, else CPUs (gloo); on: require GPUs now; wait: ask for GPUs and wait for the autoscaler to add them; off: CPUs
    threads: int = 1  # torch threads per CPU worker
    worker_cpus: float = 0.0  # CPUs each CPU worker reserves (0: threads); sweeps leave room for trial drivers
    seed: int = 0  # seeds weights, data order, prior draws and grids
    log_every: int = 10  # steps between metric reports
    checkpoint_every: int = 1000  # steps between checkpoints
    sample_every: int = 1000  # steps between EMA sample grids (K + kappa steps)
    grid_size: int = 64  # samples in a grid
    keep_checkpoints: int = 3  # checkpoints kept per run (older ones are deleted)
    max_failures: int = 2  # automatic restarts after a worker failure
    storage: str = ""  # where runs (checkpoints, grids) and fitted priors go; empty: $FDRL_HOME/runs, else ./runs
    run_name: str = ""  # empty: <dataset>-<timestamp>
    resume: bool = False  # continue run_name (or the latest run) from its last checkpoint
    experiment: str = "fdrl"  # MLflow experiment
    register: bool = True  # register the final EMA model (sweeps register only their best trial)
    register_name: str = ""  # registered model name for the final checkpoint; empty: fdrl-<dataset>
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI or sqlite under the working directory
    tracking_offline: bool = False  # start even when MLflow is unreachable: the run is created, and everything logged replayed, once it answers
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

    def __post_init__(self):
        if isinstance(self.gpu, bool):  # configs written before --gpu auto stored a bool
            self.gpu = "on" if self.gpu else "off"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def validate(self) -> "TrainConfig":
        """Checks that need nothing but the config; ``launch.check_run`` checks it against the
        data, the prior file and the cluster."""
        from fdrl.core.divergences import get_pairing
        from fdrl.core.flow import FlowSettings

        get_pairing(self.pairing)
        FlowSettings.from_config(self)
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {self.prefetch}")
        if self.prior not in ("uniform", "gaussian", "full", "lowrank", "source"):
            raise ValueError(f"unknown prior {self.prior!r}; valid: uniform, gaussian, full, lowrank, source")
        if (self.prior == "source") != bool(self.source):
            raise ValueError("translation takes both --prior source and --source DIR (the source "
                             f"domain's shards); got prior {self.prior!r}, source {self.source!r}")
        if self.workers < 1 or self.batch % self.workers:
            raise ValueError(f"batch {self.batch} must split evenly over {self.workers} workers")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        check_model_name(self.register_name)
        if self.gpu not in GPU_CHOICES:
            raise ValueError(f"--gpu {self.gpu!r}: valid values are {', '.join(GPU_CHOICES)}")
        from fdrl.core.networks import NET_SIZES

        if self.net_size not in NET_SIZES:
            raise ValueError(f"--net-size {self.net_size!r}: valid values are {', '.join(NET_SIZES)}")
        if self.eval_every and not self.eval_classifier:
            raise ValueError(f"--eval-every {self.eval_every} needs --eval-classifier (a folder or "
                             "models:/NAME@ALIAS; jobs/train_classifier.py trains one)")
        return self


MODEL_NAME_FORBIDDEN = "/:.%\"'"  # MLflow refuses these in a logged model's name


def check_model_name(name: str, flag: str = "--register-name") -> None:
    """Refuse a model name MLflow would refuse only when the trained model is logged, at the end
    of the run; "" (the default name) passes."""
    bad = sorted({c for c in name if c in MODEL_NAME_FORBIDDEN or c.isspace()})
    if bad:
        raise ValueError(f"{flag} {name!r}: a model name cannot contain {' '.join(bad)} "
                         "(MLflow refuses it when the model is logged)")


def storage_root(given, *under: str) -> str:
    """Where runs and fitted priors go: ``given`` (a TrainConfig, or a --storage value: a folder
    or an object-store URI), else $FDRL_HOME/runs (or ./runs), joined with ``under``."""
    from fdrl.data import storage
    from fdrl.env import home

    given = given.storage if isinstance(given, TrainConfig) else given
    return storage.resolve(given) if given else str(home().joinpath("runs", *under))


def field_help(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's one-line description: its trailing comment in the dataclass's source."""
    pattern = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")
    found = (pattern.match(line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def user_fields(cls: type = TrainConfig) -> list[dataclasses.Field]:
    internal = INTERNAL_FIELDS if cls is TrainConfig else frozenset()
    return [f for f in dataclasses.fields(cls) if f.name not in internal]


def add_config_args(parser: argparse.ArgumentParser, defaults) -> None:
    """One --flag per user field of the dataclass ``defaults`` (underscores become dashes),
    defaulting to its values; the help line is the field's comment."""
    descriptions = field_help(type(defaults))
    for f in user_fields(type(defaults)):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{descriptions.get(f.name, '')} (default: {json.dumps(value)})".replace("%", "%%")
        choices = f.metadata.get("choices")
        if f.name == "gpu" and type(defaults) is TrainConfig:
            parser.add_argument(flag, nargs="?", const="on", choices=GPU_CHOICES, default=value,
                                help=help_text)
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        elif isinstance(value, list):
            item = type(value[0]) if value else int
            parser.add_argument(flag, type=item, nargs="*", default=value, help=help_text)
        else:
            parser.add_argument(flag, type=type(value), default=value, choices=choices, help=help_text)


def config_from_args(args: argparse.Namespace, defaults):
    """The parsed flags over the dataclass ``defaults`` (which supplies the internal fields)."""
    names = {f.name for f in user_fields(type(defaults))}
    return dataclasses.replace(defaults, **{k: v for k, v in vars(args).items() if k in names})
