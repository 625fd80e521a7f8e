"""What checking a shard's sha256 costs, against reading and decoding it.

A stream reads each shard whole (``storage.read_bytes``), hashes those bytes, parses the tar and
decodes every image to a tensor (``fdrl.data.stream``). This times each stage on local shards of
1000 samples, best of --repeat: the MNIST-5k shards (32x32 greyscale) and shards made here of
1000 RGB images at 32 (CIFAR-10's size), 64 and 128 pixels (smooth random images: natural-looking
PNG sizes, not incompressible noise). Prints per shard: bytes, read, sha256, parse, decode (ms),
and sha256 / (read + parse + decode). A local read is the fastest read there is, so on an object
store the ratio is smaller still.

Usage: python benchmarks/shard_verify.py [--repeat 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def smooth_images(n: int, size: int, seed: int = 0):
    """n RGB images of size x size: random 4x4 colour fields, bicubic-upscaled."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8))
        yield f"img{i:05d}", np.asarray(small.resize((size, size), Image.Resampling.BICUBIC)), i % 10


def make_sets(root: Path) -> dict[str, Path]:
    from fdrl.data.writer import convert, write_shards

    sets = {"mnist-5k 32x32 L": root / "mnist"}
    convert("mnist", None, sets["mnist-5k 32x32 L"], shard_size=1000, progress=False)
    for size in (32, 64, 128):
        name = f"rgb {size}x{size}" + (" (CIFAR-sized)" if size == 32 else "")
        sets[name] = root / f"rgb{size}"
        write_shards(smooth_images(1000, size), sets[name], dataset=f"rgb{size}", source="bench",
                     preprocess="resize", resolution=size, mode="RGB", shard_size=1000,
                     progress=False)
    return sets


def time_shard(shard_set, index: int, repeat: int) -> dict[str, float]:
    from fdrl.data import storage
    from fdrl.data.stream import StreamStats, decode_sample, parse_shard

    url = shard_set.url(shard_set.shards[index])
    best: dict[str, float] = {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        data = storage.read_bytes(url)
        t1 = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        samples = parse_shard(url, data, shard_set.counts[index])
        t3 = time.perf_counter()
        stats = StreamStats()
        images = [decode_sample(key, members, shard_set, stats) for key, members in samples]
        t4 = time.perf_counter()
        assert digest == shard_set.sha256[index] and stats.skipped == 0 and all(
            i is not None for i in images)
        for stage, seconds in (("read", t1 - t0), ("sha256", t2 - t1), ("parse", t3 - t2),
                               ("decode", t4 - t3)):
            best[stage] = min(best.get(stage, float("inf")), seconds)
    best["bytes"] = len(data)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (decode)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fdrl.data.manifest import open_shard_set

    with tempfile.TemporaryDirectory() as tmp:
        sets = make_sets(Path(tmp))
        print(f"{'shard set':26} {'MiB':>6} {'read':>7} {'sha256':>7} {'parse':>7} {'decode':>8}"
              f" {'sha256/(read+parse+decode)':>27}")
        for name, path in sets.items():
            shard_set = open_shard_set(path)
            t = time_shard(shard_set, 0, args.repeat)
            rest = t["read"] + t["parse"] + t["decode"]
            print(f"{name:26} {t['bytes'] / 2**20:6.2f} {t['read'] * 1e3:6.1f}ms "
                  f"{t['sha256'] * 1e3:5.1f}ms {t['parse'] * 1e3:5.1f}ms "
                  f"{t['decode'] * 1e3:6.0f}ms {t['sha256'] / rest:26.2%}")


if __name__ == "__main__":
    main()
