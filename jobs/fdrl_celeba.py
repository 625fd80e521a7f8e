"""FDRL on CelebA at 64x64 (the paper's appendix F settings) on GPU workers.

Prepare the shards once, on a path every node sees (a shared filesystem or the same path on
each node), from img_align_celeba (the zip or the extracted folder; centre-crop 140, resize 64):

    python datasets/prepare.py celeba ~/raw/img_align_celeba.zip --out /shared/celeba

Optionally fit the full-covariance prior ahead of time with Ray tasks (otherwise the job fits it first):

    python datasets/fit_prior.py /shared/celeba --kind full --out /shared/celeba-prior.safetensors

Run it on this machine (starts a local Ray) or on a cluster (see docs/cluster.md):

    python jobs/fdrl_celeba.py --data /shared/celeba --workers 1
    ray job submit --working-dir . -- python jobs/fdrl_celeba.py --data /shared/celeba --workers 4 \\
        --storage /shared/runs --prior-path /shared/celeba-prior.safetensors
"""

import sys

from fdrl.cli import train_main
from fdrl.config import TrainConfig

# Everything else is TrainConfig's default, which is the paper's appendix F: batch 64,
# lr 1e-4 decayed x0.1 at 80k/90k of 100k steps, K=100, kappa=20, eta=3, nu=1e-2, EMA 0.998.
PRESET = TrainConfig(
    dataset="celeba",
    arch="celeba64",  # 5.13M-parameter ResNet for 3x64x64 (paper table 3)
    prior="full",  # data-dependent Gaussian, 12288 dims: a 0.6 GB factor, still fine
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
