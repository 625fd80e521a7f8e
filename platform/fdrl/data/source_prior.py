"""The source-domain prior of unpaired translation (FDRL §5): q'(x) is the source dataset.

Its samples come from a second ``ShardStream`` over the source shards, so the prior is streamed
like the data: each rank reads its own disjoint source shards, reshuffled per epoch, and the
stream's ``position`` resumes it exactly after a restart. No Gaussian is fitted.
"""

from __future__ import annotations

from typing import Optional

import torch

from fdrl.core.priors import Prior

from .manifest import open_shard_set
from .stream import ShardStream

SEED_OFFSET = 1  # the source stream's order differs from the data's even for one shard set


class SourcePrior(Prior):
    """``sample(n)`` returns the next n source images of this rank's stream. The generator
    argument is ignored: the stream's own seed and position fix the draws."""

    kind = "source"

    def __init__(self, stream: ShardStream):
        super().__init__(stream.shards.shape, clamp=None)
        self.stream = stream
        self.count = sum(stream.shards.counts)
        self._samples = stream.samples()
        self.last_keys: list[str] = []  # the keys of the latest batch (checks and debugging)

    @classmethod
    def open(cls, root, rank: int, world: int, seed: int, hflip: bool = False,
             position: Optional[dict] = None) -> "SourcePrior":
        stream = ShardStream(open_shard_set(root), rank, world, seed + SEED_OFFSET, hflip, position)
        return cls(stream)

    @property
    def position(self) -> dict:
        return dict(self.stream.position)

    def for_samples(self, seed: int) -> "SourcePrior":
        """A fresh stream over the same source images, seeded apart from training's: grids and
        evaluations of one run all start from the same source images."""
        return SourcePrior(ShardStream(self.stream.shards, 0, 1, seed + SEED_OFFSET))

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        drawn = [next(self._samples) for _ in range(n)]
        self.last_keys = [key for _, key in drawn]
        return torch.stack([image for image, _ in drawn]).to(device)

    def to(self, device) -> "SourcePrior":
        return self  # images move to the device per batch


def check_domains(source_shape, target_shape) -> None:
    """Translation flows source images into the target domain: their shapes must agree."""
    if tuple(source_shape) != tuple(target_shape):
        raise ValueError(f"source images have shape {tuple(source_shape)} but the target's have "
                         f"shape {tuple(target_shape)}: prepare both domains at the same "
                         f"resolution and channels (datasets/prepare.py --resolution)")
