"""Per-worker streams over webdataset tar shards, for distributed training.

Each epoch the shard list is permuted with a seed, and worker ``rank`` of ``world`` takes every
``world``-th shard of that order. The workers' sets are disjoint, and together they cover every
sample once per epoch. Inside a shard the sample order is shuffled with a seed. So the stream is
a pure function of (seed, rank, world, epoch): its position is (epoch, shard, offset), a resumed
run continues it exactly, and a different worker count gives a different stream.

Samples are tar members grouped by key (``KEY.png``, ``KEY.cls``). A truncated tar, a member
that does not decode as an image, or a sample without an image is skipped and counted in
``StreamStats``. Training never stops for it.
"""

from __future__ import annotations

import io
import logging
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from .manifest import ShardSet

log = logging.getLogger(__name__)


@dataclass
class StreamStats:
    samples: int = 0
    skipped: int = 0
    reasons: dict = field(default_factory=dict)

    def skip(self, where: str, why: str):
        self.skipped += 1
        if len(self.reasons) < 100:
            self.reasons[where] = why
        log.warning("skipped %s: %s", where, why)


def _shard_samples(path: Path, stats: StreamStats,
                   expected: Optional[int] = None) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of one tar shard as (key, {ext: bytes}), in tar order. A truncated tail is
    counted as one skip and the intact samples before it are kept. tarfile reads a tar cut inside
    a header as a clean end, so fewer samples than the manifest's ``expected`` count also skips."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        stats.skip(f"{path.name} (after {len(groups)} samples)", f"unreadable tar: {err}")
    else:
        if expected is not None and len(groups) < expected:
            stats.skip(path.name, f"unreadable tar: truncated, {len(groups)} of {expected} samples")
    return list(groups.items())


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """PNG/JPEG bytes -> float tensor (C, H, W) in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).float().div_(127.5).sub_(1.0)


def decode_sample(key: str, members: dict[str, bytes], shard_set: ShardSet,
                  stats: StreamStats) -> Optional[torch.Tensor]:
    """The image of one sample, or None (skipped and counted) when it has no image member, the
    image does not decode, or its shape is not the shard set's."""
    data = members.get("png") or members.get("jpg") or members.get("webp")
    if data is None:
        stats.skip(key, f"no image member (has: {', '.join(sorted(members)) or 'nothing'})")
        return None
    try:
        image = decode_image(data, shard_set.channels)
    except Exception as err:  # PIL raises many types for corrupt data
        stats.skip(key, f"undecodable image: {err}")
        return None
    if tuple(image.shape) != shard_set.shape:
        stats.skip(key, f"image shape {tuple(image.shape)} != {shard_set.shape}")
        return None
    return image


def iter_samples(shard_set: ShardSet, stats: StreamStats,
                 shards: Optional[list[str]] = None) -> Iterator[tuple[str, dict, torch.Tensor]]:
    """(key, members, image) of every decodable sample, shard by shard in manifest order
    (or over ``shards``, a subset of the manifest's), unshuffled: for fits and evaluation."""
    counts = dict(zip(shard_set.shards, shard_set.counts))
    for name in shards if shards is not None else shard_set.shards:
        for key, members in _shard_samples(shard_set.root / name, stats, counts[name]):
            image = decode_sample(key, members, shard_set, stats)
            if image is not None:
                yield key, members, image


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def epoch_shards(n_shards: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    order = np.random.default_rng(_seed(seed, epoch)).permutation(n_shards)
    return [int(i) for i in order[rank::world]]


class ShardStream:
    """Infinite stream of (image, key) for one worker; ``position`` resumes it exactly."""

    def __init__(self, shard_set: ShardSet, rank: int, world: int, seed: int,
                 hflip: bool = False, position: Optional[dict] = None):
        if len(shard_set.shards) < world:
            raise ValueError(
                f"{len(shard_set.shards)} shards cannot feed {world} workers disjointly: "
                f"re-shard with a smaller --shard-size")
        self.shards, self.rank, self.world, self.seed = shard_set, rank, world, seed
        self.hflip = hflip
        self.stats = StreamStats()
        self.position = dict(position or {"epoch": 0, "shard": 0, "offset": 0})

    def samples(self) -> Iterator[tuple[torch.Tensor, str]]:
        """Yields (image, key); ``position`` always points at the next sample to read."""
        pos = self.position
        while True:
            mine = epoch_shards(len(self.shards.shards), pos["epoch"], self.seed, self.rank, self.world)
            while pos["shard"] < len(mine):
                index = mine[pos["shard"]]
                path = self.shards.root / self.shards.shards[index]
                samples = _shard_samples(path, self.stats, self.shards.counts[index])
                order = np.random.default_rng(_seed(self.seed, pos["epoch"], index)).permutation(len(samples))
                while pos["offset"] < len(order):
                    key, members = samples[order[pos["offset"]]]
                    pos["offset"] += 1
                    image = self._decode(key, members)
                    if image is not None:
                        self.stats.samples += 1
                        yield image, key
                pos["shard"], pos["offset"] = pos["shard"] + 1, 0
            pos["epoch"], pos["shard"] = pos["epoch"] + 1, 0

    def _decode(self, key: str, members: dict[str, bytes]) -> Optional[torch.Tensor]:
        image = decode_sample(key, members, self.shards, self.stats)
        if image is not None and self.hflip and _seed(self.seed, self.position["epoch"], zlib.crc32(key.encode())) & 1:
            image = image.flip(-1)
        return image

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        it = self.samples()
        while True:
            yield torch.stack([next(it)[0] for _ in range(batch_size)])
