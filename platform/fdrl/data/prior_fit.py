"""The data-dependent prior, fitted from shards in mergeable pieces: each group of shards is
streamed into ``Moments`` (or a randomised ``Sketch`` for a low-rank prior above 64x64x3); the
pieces merge in a fixed order, so the prior does not depend on which process fitted which group;
the merged statistics are factored, fully or in low-rank form (``fdrl.core.priors``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fdrl.core.priors import Moments, Prior, Sketch, fit_full, fit_lowrank
from fdrl.data.manifest import ShardSet
from fdrl.data.stream import StreamStats, iter_samples

KINDS = ("full", "lowrank")
SKETCH_OVERSAMPLE = 10  # extra sketch columns beyond the rank, for accuracy of the top eigenpairs
FULL_MAX_DIM = 64 * 64 * 3  # above this a d x d float64 matrix per group is too big: use the sketch


@dataclass(frozen=True)
class PriorFit:
    """What every group's statistics are computed with."""

    shard_set: ShardSet
    kind: str  # full | lowrank
    rank: int
    seed: int  # of the sketch's test matrix

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"only data-dependent priors are fitted ({', '.join(KINDS)}), not {self.kind!r}")

    @property
    def dim(self) -> int:
        return math.prod(self.shard_set.shape)

    @property
    def sketched(self) -> bool:
        return self.kind == "lowrank" and self.dim > FULL_MAX_DIM

    @property
    def width(self) -> int:
        return min(self.rank + SKETCH_OVERSAMPLE, self.dim)


def shard_groups(shard_set: ShardSet, groups: int) -> list[list[str]]:
    """The shards dealt round-robin into at most ``groups`` groups (none empty)."""
    groups = max(1, min(groups, len(shard_set.shards)))
    return [list(shard_set.shards[i::groups]) for i in range(groups)]


def group_stats(fit: PriorFit, shards: list[str]) -> tuple[Moments | Sketch, int]:
    """The statistics of one group of shards, and how many corrupt samples were skipped. One
    shard at a time is in memory. An unreadable shard raises, naming it: a prior fitted on a
    subset of the data would be wrong without a word."""
    stats = Sketch.zeros(fit.dim, fit.width, fit.seed) if fit.sketched else Moments.zeros(fit.dim)
    omega = Sketch.test_matrix(fit.dim, fit.width, fit.seed) if fit.sketched else None
    skipped = StreamStats()
    for shard in shards:
        images = [image for _, _, image in iter_samples(fit.shard_set, skipped, [shard])]
        if images:
            batch = torch.stack(images)
            stats.update(batch, omega) if omega is not None else stats.update(batch)
    return stats, skipped.skipped


def fit_prior(fit: PriorFit, pieces: list[Moments | Sketch]) -> Prior:
    """Merge the groups' statistics in group order and factor them."""
    merged = None
    for stats in pieces:
        merged = stats if merged is None else merged.merge(stats)
    if fit.kind == "full":
        return fit_full(merged, fit.shard_set.shape, clamp=1.0)
    return fit_lowrank(merged, fit.shard_set.shape, rank=min(fit.rank, fit.dim), clamp=1.0)
