"""FDRL on LSUN Church outdoor at 128x128 (the paper's appendix F settings) on GPU workers.

Prepare the shards once, on a path every node sees (a shared filesystem or the same path on
each node), from the LSUN lmdb export (`pip install -e '.[lsun]'` for lmdb):

    python datasets/prepare.py lsun ~/raw/church_outdoor_train_lmdb --out /shared/church

Optionally fit the low-rank prior ahead of time with Ray tasks (otherwise the job fits it first):

    python datasets/fit_prior.py /shared/church --kind lowrank --rank 512 --out /shared/church-prior.safetensors

Run it on this machine (starts a local Ray) or on a cluster (see docs/cluster.md):

    python jobs/fdrl_church.py --data /shared/church --workers 1
    ray job submit --working-dir . -- python jobs/fdrl_church.py --data /shared/church --workers 8 \\
        --storage /shared/runs --prior-path /shared/church-prior.safetensors
"""

import sys

from fdrl.cli import train_main
from fdrl.config import TrainConfig

# Everything else is TrainConfig's default, which is the paper's appendix F: batch 64,
# lr 1e-4 decayed x0.1 at 80k/90k of 100k steps, K=100, kappa=20, eta=3, nu=1e-2, EMA 0.998.
PRESET = TrainConfig(
    dataset="church",
    arch="church128",  # 5.44M-parameter ResNet for 3x128x128 (paper table 3)
    prior="lowrank",  # data-dependent Gaussian; its full 49152^2 factor would be 9.7 GB
    prior_rank=512,  # top principal components, plus an isotropic residual (PPCA)
    gpu="auto",  # one GPU per worker (NCCL) when the cluster has GPUs; --gpu on requires them
    workers=4,
    log_every=50,
    checkpoint_every=2000,  # ~24 TFLOP per step, the slowest preset: checkpoint more often
    sample_every=2000,
    fid=True,  # standard FID-2000 of EMA samples every fid_every steps and at the end
    fid_samples=2000,
    fid_every=10_000,
)

if __name__ == "__main__":
    sys.exit(train_main(PRESET, __doc__))
