"""FDRL on CIFAR-10 at 32x32 (the paper's appendix F settings) on GPU workers.

Prepare the shards once, on a path every node sees (a shared filesystem or the same path on
each node), from the python-pickle batches (cifar-10-batches-py):

    python datasets/prepare.py cifar10 ~/raw/cifar-10-batches-py --out /shared/cifar10

Optionally fit the full-covariance prior ahead of time with Ray tasks (otherwise the job fits it first):

    python datasets/fit_prior.py /shared/cifar10 --kind full --out /shared/cifar10-prior.safetensors

Run it on this machine (starts a local Ray) or on a cluster (see docs/cluster.md):

    python jobs/fdrl_cifar10.py --data /shared/cifar10 --workers 1
    ray job submit --working-dir . -- python jobs/fdrl_cifar10.py --data /shared/cifar10 --workers 4 \\
        --storage /shared/runs --prior-path /shared/cifar10-prior.safetensors
"""

import sys

from fdrl.cli import train_main
from fdrl.config import TrainConfig

PRESET = TrainConfig(
    dataset="cifar10",
    arch="cifar10",  # 11.37M-parameter ResNet for 3x32x32 (paper table 3)
    prior="full",  # data-dependent Gaussian, 3072 dims
    hflip=True,
    steps=100_000,
    batch=64,  # global; 16 per worker with 4 workers
    lr=1e-4,
    decay_steps=[80_000, 90_000],  # lr x 0.1
    flow_steps=100,  # K
    extra_steps=20,  # kappa for the data-dependent prior
    eta=3.0,
    nu=0.01,
    ema=0.998,
    gpu=True,  # NCCL, one GPU per worker
    workers=4,
    log_every=50,
    checkpoint_every=5000,
    sample_every=5000,
    grid_size=64,
)

if __name__ == "__main__":
    sys.exit(train_main(PRESET, __doc__))
