"""Train FDRL on your own images: any shard set made by datasets/prepare.py.

1. Convert a folder of images (jpg/png/webp, nested folders are fine) into shards:

    python datasets/prepare.py folder ~/my-images --out data/mine --resolution 32 --channels 1

   --channels 1 keeps grayscale, 3 stores RGB; every image is resized (shorter side) and
   centre-cropped to RESOLUTION x RESOLUTION.

2. Train on it. The network is built for the data's shape (channels, resolution): the paper's
   ResNet family, sized by --net-size s|m|l or by explicit --net-widths. Every flag below works
   as in the paper presets (jobs/fdrl_cifar10.py, ...):

    python jobs/fdrl_train.py --data data/mine --steps 1000 --workers 2

   --dry-run prints the resolved run (network, paths, prior) without starting anything. The
   data, the network and the prior are checked against each other before any worker starts.
   Runs, fitted priors and the MLflow database go under $FDRL_HOME (default: this directory).

3. Sample and evaluate the registered model (docs/own-data.md walks through a whole session):

    python jobs/sample.py --model models:/fdrl-mine@candidate --n 256 --out runs/mine-samples
"""

import sys

from fdrl.cli import train_main
from fdrl.config import TrainConfig

# A CPU-friendly start for a few thousand small images; the paper's values are in
# fdrl/config.py (TrainConfig) and the paper presets.
PRESET = TrainConfig(
    dataset="",  # the data folder's name: runs are <name>-<time>, the model fdrl-<name>
    arch="auto",  # built for the data's shape
    net_size="s",  # ~0.17M parameters; m and l are 4x and 16x that
    prior="full",  # data-dependent Gaussian; use --prior lowrank above ~64x64x3
    steps=1000,
    decay_steps=[800, 900],  # lr x 0.1 at 80% and 90% of the run, as the paper
    lr=5e-4,  # larger than the paper's 1e-4 for a short run
    flow_steps=20,  # K; the paper's 100 costs 5x per step
    extra_steps=20,
    ema=0.99,  # 0.998 averages over ~500 steps: too long for a short run
    log_every=20,
    checkpoint_every=200,
    sample_every=200,
    fid=True,  # standard FID-256 at the end: the quality metric for data without labels
)

if __name__ == "__main__":
    sys.exit(train_main(PRESET, __doc__))
