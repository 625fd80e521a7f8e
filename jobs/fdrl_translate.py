"""Unpaired image-to-image translation with FDRL (paper §5): the prior is the source domain.

The same training as unconditional FDRL (Algorithm 1), with the prior's samples streamed from the
source domain's shards like the data (each worker its own disjoint source shards, exact resume)
and the target domain as the data. The flow then carries source images into the target domain.
No Gaussian is fitted. The model is registered as fdrl-<source>-to-<target> with alias candidate.

    python datasets/prepare.py sklearn-digits --out data/digits --shard-size 300
    python jobs/fdrl_translate.py --source data/digits --target data/mnist5k --steps 400
    python jobs/sample.py --model models:/fdrl-digits-to-mnist5k@candidate --input data/digits --out runs/translated

Presets (--preset): digits (default; the MNIST demo's settings, CPU) and cat2dog (the paper's
Cat2dog setting on GPU workers: 64x64, its shallow network, 40k steps with decay at 20k/30k,
K = 100 in training and K + kappa = 110 at test):

    python datasets/prepare.py cat2dog ~/raw/cat2dog --out /shared/cat2dog
    python jobs/fdrl_translate.py --preset cat2dog --source /shared/cat2dog/trainA --target /shared/cat2dog/trainB
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from fdrl.cli import train_main
from fdrl.config import TrainConfig
from fdrl.presets import MNIST

PRESETS = {
    # The MNIST-5k demo's settings with the source domain as the prior. Sampling stops at K: FD to
    # MNIST is lowest there, and more steps lose the source's class (BENCHMARKS.md, "Translation:
    # class preservation and FD against flow steps").
    "digits": dataclasses.replace(MNIST, dataset="", prior="source", extra_steps=0),
    "cat2dog": TrainConfig(
        dataset="",  # named after the two domains
        arch="cat2dog64",  # the shallow 64x64 network of the paper's Cat2dog experiment
        prior="source",
        steps=40_000,
        decay_steps=[20_000, 30_000],
        flow_steps=100,
        extra_steps=10,  # K + kappa = 110 at test
        gpu="auto",  # one GPU per worker when the cluster has GPUs; --gpu on requires them
        workers=4,
        log_every=50,
        checkpoint_every=2000,
        sample_every=2000,
    ),
}


def domain_name(path: str) -> str:
    return Path(path).resolve().name


def named_after_domains(cfg: TrainConfig) -> TrainConfig:
    """Runs and the registered model are fdrl-<source>-to-<target> unless --dataset names them."""
    if not cfg.source or not cfg.data:
        raise ValueError("give --source DIR (the source domain) and --target DIR (the target domain)")
    if cfg.dataset:
        return cfg
    return dataclasses.replace(cfg, dataset=f"{domain_name(cfg.source)}-to-{domain_name(cfg.data)}")


def add_domain_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits",
                        help="digits (CPU, the MNIST demo's settings) or cat2dog (the paper's, GPUs)")
    parser.add_argument("--target", dest="data", default=argparse.SUPPRESS,
                        help="the target domain's shard directory (the data; same as --data)")


def main(argv=None) -> int:
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    preset = PRESETS[chooser.parse_known_args(argv)[0].preset]  # the preset sets every default
    return train_main(preset, __doc__, argv, extend=add_domain_flags, finish=named_after_domains)


if __name__ == "__main__":
    sys.exit(main())
