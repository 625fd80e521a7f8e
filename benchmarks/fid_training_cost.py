"""What the end-of-run FID adds to the MNIST demo, as a ratio measured in one process: the time of
one ``TrainingFID`` call (what rank 0 runs at the end: --fid-samples EMA samples through K + kappa
flow steps, then the Inception) against the time of demo training steps (batch 64, K = 20, the
mnist32 net) on the same threads. Multiplying the ratio by the demo's 400 steps gives the share of
training time; the ratio, not the seconds, carries over between machines of one kind.

Usage: python benchmarks/fid_training_cost.py [--steps 5] [--fid-samples 256] [--threads 2]"""

import argparse
import tempfile
import time
from pathlib import Path

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fid-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference", default=None, help="cached reference statistics (default: computed)")
    args = p.parse_args()

    import torch

    from fdrl.core.divergences import get_pairing
    from fdrl.core.flow import FlowSettings
    from fdrl.core.networks import build_network
    from fdrl.core.priors import Moments, fit_full
    from fdrl.core.step import make_state, train_step
    from fdrl.data.stream import ShardStream
    from fdrl.data.manifest import open_shard_set
    from fdrl.data.stream import shard_batches
    from fdrl.eval.fid import feature_stats
    from fdrl.eval.inception import InceptionFeatures
    from fdrl.eval.training_fid import TrainingFID
    from fdrl.presets import MNIST, mnist_data

    torch.set_num_threads(args.threads)
    data = mnist_data()
    shard_set = open_shard_set(data)
    prior = fit_full(Moments.zeros(1024).update(torch.cat(list(shard_batches(data, limit=2000)))),
                     shard_set.shape, clamp=1.0)
    torch.manual_seed(0)
    state = make_state(build_network(MNIST.arch), MNIST.lr)
    pairing, flow = get_pairing(MNIST.pairing), FlowSettings.from_config(MNIST)
    batches = ShardStream(shard_set, 0, 1, 0).batches(MNIST.batch)
    gen = torch.Generator().manual_seed(0)
    train_step(state, next(batches), prior, pairing, flow, gen, MNIST.dequant, MNIST.ema)  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(state, next(batches), prior, pairing, flow, gen, MNIST.dequant, MNIST.ema)
    step_s = (time.perf_counter() - start) / args.steps

    with tempfile.TemporaryDirectory() as tmp:
        reference = args.reference  # once per dataset, then cached: not part of the cost
        if not reference:
            reference = feature_stats(InceptionFeatures(), shard_batches(data, 64, limit=args.fid_samples),
                                      limit=args.fid_samples).save(Path(tmp) / "reference.safetensors")
        fid = TrainingFID(reference, args.fid_samples, 0, 0, "cpu", threads=args.threads)
        value = fid(state.ema, prior, pairing, flow)
    print(f"training step (batch {MNIST.batch}, K = {MNIST.flow_steps}): {step_s:.2f} s")
    print(f"end-of-run FID-{args.fid_samples}: {fid.seconds:.1f} s (value {value:.1f}) "
          f"= {fid.seconds / step_s:.0f} training steps = {100 * fid.seconds / (step_s * MNIST.steps):.0f}% "
          f"of the demo's {MNIST.steps} steps on one process")


if __name__ == "__main__":
    main()
