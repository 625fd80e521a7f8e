"""Standard FID inside training (rank 0): ``fid_samples`` EMA samples (K + kappa steps, fixed seed,
the core sampler's chunks) against the dataset's cached reference statistics of as many real
images. FID-N with small N is biased upwards, so compare values at one N only; it is the same
yardstick on every dataset and every pairing, which is what ASHA needs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from fdrl.core.chunks import chunks
from fdrl.core.flow import FlowSettings
from fdrl.core.sampler import sample_chunk
from fdrl.eval.fid import FeatureStats, fid
from fdrl.eval.inception import InceptionFeatures

FID_SEED_OFFSET = 54321  # its own seed, apart from training and grid draws


class TrainingFID:
    def __init__(self, reference: str | Path, n: int, seed: int, every: int, device="cpu",
                 weights: Optional[str] = None, threads: int = 0):
        """``reference``: the statistics file the launcher prepared (a local copy)."""
        if n < 2:
            raise ValueError(f"fid_samples must be >= 2, got {n}")
        self.n, self.seed, self.every, self.device = n, seed + FID_SEED_OFFSET, every, device
        self.threads = threads  # CPU threads while computing (the other ranks wait at a collective)
        self.features = InceptionFeatures(weights or None, device)
        self.reference = FeatureStats.load(reference)
        self.seconds = 0.0

    def due(self, step: int, final: bool, have_value: bool = True) -> bool:
        """At the end; with ``every``, also every ``every`` steps and at the first report (so every
        report Tune sees carries the metric)."""
        return final or bool(self.every and (step % self.every == 0 or not have_value))

    def _features_of_chunk(self, net, pairing, flow, prior, index, size) -> torch.Tensor:
        x = sample_chunk(net, pairing, flow, self.seed, index, size, prior=prior, device=self.device).x
        return self.features(x.clamp(-1, 1))

    def __call__(self, net, prior, pairing, flow: FlowSettings) -> float:
        start = time.perf_counter()
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            stats = FeatureStats.empty()
            for index, _, size in chunks(self.n):  # one chunk at 299^2 in memory at a time
                feats = self._features_of_chunk(net, pairing, flow, prior, index, size)
                if not torch.isfinite(feats).all():
                    return float("inf")
                stats.update(feats)
            return fid(stats, self.reference)
        except ValueError as err:  # non-finite samples: a diverged model scores worst, not a crash
            if "non-finite" in str(err):
                return float("inf")
            raise
        finally:
            torch.set_num_threads(before)
            self.seconds = time.perf_counter() - start
