"""Per-worker streams over webdataset tar shards, for distributed training.

Each epoch the shard list is permuted with a seed, and each shard's samples are shuffled with a
seed; laid end to end that gives the epoch's sample order. Worker ``rank`` of ``world`` takes the
``rank``-th of ``world`` contiguous, equal (to one sample) slices of it. So the workers' samples
are disjoint, together they cover every sample once per epoch, any number of workers up to the
number of samples can share even a single shard, and a worker opens only the shards its slice
touches. The stream is a pure function of (seed, rank, world, epoch): its position is (epoch,
index in the worker's slice), a resumed run continues it exactly, and a different worker count
gives a different stream.

A shard (local or on an object store) is read whole into memory through ``fdrl.data.storage``,
its sha256 checked against the manifest's, and its bytes handed to ``tarfile``. A shard that
cannot be read (missing, unreachable, permission denied), whose bytes are not the manifest's, that
is not a readable tar, or that holds more or fewer samples than the manifest says stops the run
with a ``ShardReadError`` naming it: training on part of the data, without a word, is worse than
not training. Samples are tar members grouped by key (``KEY.png``, ``KEY.cls``). Inside a readable
shard, a corrupt sample (an image that does not decode, a decompression bomb, a member over
``limits.MAX_MEMBER_BYTES``, no image, the wrong shape) is skipped and counted in
``StreamStats``: training does not stop for it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from . import limits, storage
from .manifest import ShardSet, open_shard_set

log = logging.getLogger(__name__)


class ShardReadError(OSError):
    """A shard that cannot be used as the manifest describes it; ``str()`` names its URI.

    An ``OSError``: most causes are I/O (a missing object, an unreachable endpoint, permission
    denied) and keep the storage error's errno; bytes that are not the manifest's are a failed
    read too, as a checksum error is on a disk. Callers that report bad paths (``except OSError``
    in the jobs) report it the same way. It pickles with its fields, as Ray sends a worker's
    exception to the driver by pickling it.
    """

    def __init__(self, url: str, reason: str, code: Optional[int] = None):
        super().__init__(f"cannot read shard {url}: {reason}")
        self.url, self.reason = url, reason
        if code is not None:
            self.errno = code  # only errno: setting filename would change str()

    def __reduce__(self):
        return type(self), (self.url, self.reason, self.errno)


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


class _Refused:
    """Stands for a member that was not read (over ``limits.MAX_MEMBER_BYTES``): its sample is
    still counted against the manifest, and skipped when decoded."""

    def __init__(self, reason: str):
        self.reason = reason


def read_shard_bytes(url: str, sha256: Optional[str] = None, size: Optional[int] = None) -> bytes:
    """The bytes of one shard, checked against the manifest's sha256 (hashed from the bytes just
    read: no second read). Any failure is a ``ShardReadError`` naming ``url``."""
    try:
        data = storage.read_bytes(url)
    except OSError as err:  # StorageError: missing, unreachable, wrong credentials, permission
        raise ShardReadError(url, getattr(err, "reason", None) or str(err),
                             getattr(err, "errno", None)) from err
    if sha256:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            sizes = f"{len(data)} bytes" + (f", the manifest says {size}" if size is not None else "")
            raise ShardReadError(url, f"its sha256 {actual[:16]}... ({sizes}) does not match the "
                                      f"manifest's {sha256[:16]}...: the shard changed after the "
                                      "manifest was written; prepare the data again", errno.EIO)
    return data


def _shard_samples(url: str, expected: Optional[int] = None, sha256: Optional[str] = None,
                   size: Optional[int] = None) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of one tar shard as (key, {ext: bytes}), in tar order, exactly ``expected``
    of them (the manifest's count). A member over ``limits.MAX_MEMBER_BYTES`` is not read (its
    declared size says so); its sample is skipped when decoded. Everything else that is wrong
    with the shard raises ``ShardReadError``."""
    return parse_shard(url, read_shard_bytes(url, sha256, size), expected)


def parse_shard(url: str, data: bytes,
                expected: Optional[int] = None) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of a shard's bytes (``_shard_samples`` without the read)."""
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                try:
                    limits.check_member_size(f"{storage.name(url)}/{member.name}", member.size)
                except ValueError as err:
                    groups.setdefault(key, {})[ext] = _Refused(str(err))
                    continue
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:
        raise ShardReadError(url, f"not a readable tar ({err}) after {len(groups)} samples",
                             errno.EIO) from err
    # tarfile reads a tar cut inside a header as a clean end: the count is what tells.
    if expected is not None and len(groups) != expected:
        raise ShardReadError(url, f"it holds {len(groups)} samples, the manifest says {expected}: "
                                  "the shard changed after the manifest was written; prepare the "
                                  "data again", errno.EIO)
    return list(groups.items())


def read_shard(shard_set: ShardSet, index: int) -> list[tuple[str, dict]]:
    """The samples of shard ``index`` of ``shard_set``, verified against its manifest row."""
    name = shard_set.shards[index]
    return _shard_samples(shard_set.url(name), shard_set.counts[index],
                          shard_set.sha256[index], shard_set.sizes[index])


def decode_image(data: bytes, channels: int, what: str = "image",
                 size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """PNG/JPEG bytes -> float tensor (C, H, W) in [-1, 1]. Refuses a decompression bomb, and an
    image whose header is not ``size`` (width, height), before decoding its pixels."""
    with limits.open_image(io.BytesIO(data), what) as img:
        if size is not None and img.size != tuple(size):
            raise _WrongShape(f"image shape {(channels, img.height, img.width)} != "
                              f"{(channels, size[1], size[0])}")
        img = img.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).float().div_(127.5).sub_(1.0)


class _WrongShape(ValueError):
    pass


def decode_sample(key: str, members: dict, shard_set: ShardSet,
                  stats: StreamStats) -> Optional[torch.Tensor]:
    """The image of one sample, or None (skipped and counted) when a member was refused, it has
    no image member, the image is a decompression bomb or does not decode, or its shape is not
    the shard set's."""
    refused = [m.reason for m in members.values() if isinstance(m, _Refused)]
    if refused:
        stats.skip(key, f"member refused: {refused[0]}")
        return None
    data = members.get("png") or members.get("jpg") or members.get("webp")
    if data is None:
        stats.skip(key, f"no image member (has: {', '.join(sorted(members)) or 'nothing'})")
        return None
    try:
        image = decode_image(data, shard_set.channels, key,
                             (shard_set.resolution, shard_set.resolution))
    except limits.DecompressionBombError as err:
        stats.skip(key, str(err))  # says "decompression bomb"
        return None
    except _WrongShape as err:
        stats.skip(key, str(err))
        return None
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
    (or over ``shards``, a subset of the manifest's), unshuffled: for fits and evaluation. A shard
    that cannot be read raises ``ShardReadError``."""
    index = {name: i for i, name in enumerate(shard_set.shards)}
    for name in shards if shards is not None else shard_set.shards:
        for key, members in read_shard(shard_set, index[name]):
            image = decode_sample(key, members, shard_set, stats)
            if image is not None:
                yield key, members, image


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def epoch_plan(counts: list[int], epoch: int, seed: int, rank: int,
               world: int) -> list[tuple[int, int, int]]:
    """What ``rank`` reads in ``epoch``: (shard index, first, stop) ranges of each shard's shuffled
    sample order, in the epoch's shard order. Slices follow the manifest counts."""
    total = sum(counts)
    start, stop = rank * total // world, (rank + 1) * total // world
    plan, offset = [], 0
    for index in np.random.default_rng(_seed(seed, epoch)).permutation(len(counts)):
        count = counts[index]
        first, last = max(start, offset), min(stop, offset + count)
        if first < last:
            plan.append((int(index), first - offset, last - offset))
        offset += count
    return plan


def shard_order(count: int, seed: int, epoch: int, index: int) -> np.ndarray:
    return np.random.default_rng(_seed(seed, epoch, index)).permutation(count)


class ShardStream:
    """Infinite stream of (image, key) for one worker; ``position`` resumes it exactly."""

    def __init__(self, shard_set: ShardSet, rank: int, world: int, seed: int,
                 hflip: bool = False, position: Optional[dict] = None):
        if shard_set.total < world:
            raise ValueError(f"{shard_set.total} samples in {shard_set.root} cannot feed {world} "
                             f"workers: use at most {shard_set.total} workers")
        if position is not None and set(position) != {"epoch", "index"}:
            raise ValueError(f"data position {position} is not (epoch, index): it was written by an "
                             "older stream format, so this run cannot resume exactly; start a new run")
        self.shards, self.rank, self.world, self.seed = shard_set, rank, world, seed
        self.hflip = hflip
        self.stats = StreamStats()
        self.position = dict(position or {"epoch": 0, "index": 0})

    def samples(self) -> Iterator[tuple[torch.Tensor, str]]:
        """Yields (image, key); ``position`` always points at the next sample to read."""
        pos, counts = self.position, list(self.shards.counts)
        while True:
            yielded, seen, started_at = 0, 0, pos["index"]
            for index, first, stop in epoch_plan(counts, pos["epoch"], self.seed, self.rank, self.world):
                if pos["index"] >= seen + stop - first:  # this range was read before a resume
                    seen += stop - first
                    continue
                samples = read_shard(self.shards, index)  # exactly counts[index] samples
                order = shard_order(counts[index], self.seed, pos["epoch"], index)
                for slot in order[first + pos["index"] - seen:stop]:
                    pos["index"] += 1
                    key, members = samples[slot]
                    image = self._decode(key, members)
                    if image is not None:
                        self.stats.samples += 1
                        yielded += 1
                        yield image, key
                seen += stop - first
            if not yielded and started_at == 0:  # a whole epoch of nothing: fail, don't spin
                raise ValueError(f"worker {self.rank}: no readable sample in its slice of "
                                 f"{self.shards.root} (skipped: {self.stats.reasons})")
            pos["epoch"], pos["index"] = pos["epoch"] + 1, 0

    def _decode(self, key: str, members: dict[str, bytes]) -> Optional[torch.Tensor]:
        image = decode_sample(key, members, self.shards, self.stats)
        if image is not None and self.hflip and _seed(self.seed, self.position["epoch"], zlib.crc32(key.encode())) & 1:
            image = image.flip(-1)
        return image

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        it = self.samples()
        while True:
            yield torch.stack([next(it)[0] for _ in range(batch_size)])


def shard_batches(data: str | ShardSet, batch_size: int = 256,
                  limit: Optional[int] = None) -> Iterator[torch.Tensor]:
    """A shard set's images (``data``: the set or its folder) in manifest order as float batches
    (N, C, H, W) in [-1, 1], at most ``limit`` images."""
    shard_set = data if isinstance(data, ShardSet) else open_shard_set(data)
    buf: list[torch.Tensor] = []
    emitted = 0
    for _, _, image in iter_samples(shard_set, StreamStats()):
        buf.append(image)
        if limit is not None and emitted + len(buf) >= limit:
            yield torch.stack(buf[:limit - emitted])
            return
        if len(buf) == batch_size:
            yield torch.stack(buf)
            emitted += len(buf)
            buf = []
    if buf:
        yield torch.stack(buf)
