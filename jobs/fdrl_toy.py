"""FDRL on 2D toy data (25Gaussians, 2DSwissroll) with prior N(0, I), on one process.

Writes DIR/samples.npy (N x 2, data units), DIR/metrics.json and DIR/samples.png.
Defaults follow the reference's swissroll config (MLP 3x64, batch 1024, eta 1, nu 1e-2, EMA 0.998)
with 3k steps instead of 20k, K = 100 instead of 200 and lr 5e-4 instead of 5e-5, so that a
run takes minutes on 2 CPU cores.

    python jobs/fdrl_toy.py --dataset 25gaussians --pairing lr-kl --out runs/toy
"""

import argparse
import json
import sys

from fdrl.config import add_config_args, config_from_args
from fdrl.workflows.toy import ToyConfig, train_toy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, ToyConfig())
    try:
        metrics = train_toy(config_from_args(p.parse_args(argv), ToyConfig()))
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
