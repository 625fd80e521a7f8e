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

# Everything else is TrainConfig's default, which is the paper's appendix F: batch 64,
# lr 1e-4 decayed x0.1 at 80k/90k of 100k steps, K=100, kappa=20, eta=3, nu=1e-2, EMA 0.998.
PRESET = TrainConfig(
    dataset="cifar10",
    arch="cifar10",  # 11.37M-parameter ResNet for 3x32x32 (paper table 3)
    prior="full",  # data-dependent Gaussian, 3072 dims
    gpu="auto",  # one GPU per worker (NCCL) when the cluster has GPUs; --gpu on requires them
    workers=4,
    log_every=50,
    checkpoint_every=5000,
    sample_every=5000,
    fid=True,  # standard FID-2000 of EMA samples every fid_every steps and at the end
    fid_samples=2000,
    fid_every=10_000,
)

if __name__ == "__main__":
    sys.exit(train_main(PRESET, __doc__))
