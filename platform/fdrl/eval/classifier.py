"""A small CNN digit classifier for the MNIST-5k shards: a domain feature network for metrics.

``MnistClassifier.features(x)`` gives the penultimate activations (128-d by default), the
feature space of :func:`fdrl.metrics.feature_metrics` (a Fréchet distance / KID for digits that
needs no Inception weights). Training uses a deterministic 90/10 split by sample key hash.

Training can be adversarial (L2 PGD, ``PGDSettings``): a robust classifier has input gradients
that look like the class, which is what class guidance (``fdrl.core.guidance``) needs.

Saved as plain files, never pickles: ``model.safetensors`` (the weights) and ``config.json``
(architecture, data, accuracy). ``fdrl.tracking.classifiers`` registers them in MLflow and loads
them back hash-checked.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# ------------------------------------------------------------------------------------- data


def strided_subset(n_total: int, n: int) -> torch.Tensor:
    """``n`` evenly spaced indices of ``range(n_total)``: a subset spread over every shard, and
    class-balanced even for a shard set that was written sorted by label."""
    n = min(n, n_total)
    return torch.arange(n) * n_total // n


def heldout_key(key: str, percent: int = 10) -> bool:
    """Deterministic split: a sample is held out when crc32(key) % 100 < percent."""
    return zlib.crc32(key.encode()) % 100 < percent


def load_labeled(root: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All labelled samples of a shard set, in manifest order: images (N, C, H, W) in [-1, 1],
    labels (N,) int64 from each sample's ``.cls`` member, and keys. Samples without a label or
    with an unreadable image are skipped (and logged), as in training."""
    from fdrl.data.stream import StreamStats, iter_samples
    from fdrl.data.manifest import open_shard_set

    stats = StreamStats()
    images, labels, keys = [], [], []
    for key, members, image in iter_samples(open_shard_set(root), stats):
        try:
            label = int(members["cls"].decode().strip())
        except (KeyError, ValueError) as err:  # no label member, or not an integer
            stats.skip(key, f"no usable .cls label: {err!r}")
            continue
        images.append(image)
        labels.append(label)
        keys.append(key)
    if not images:
        raise ValueError(f"no labelled samples in {root} (the classifier needs .cls members)")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys


# ------------------------------------------------------------------------------------ model


@dataclass
class ClassifierConfig:
    in_shape: tuple[int, int, int] = (1, 32, 32)
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 32, 64)  # one conv + 2x2 max-pool stage each
    feature_dim: int = 128
    dropout: float = 0.3

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("in_shape", "channels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class MnistClassifier(nn.Module):
    """conv3x3-ReLU-maxpool stages -> flatten -> dense ``feature_dim`` + ReLU (the features)
    -> dropout -> dense ``num_classes`` (logits). No batch norm: outputs depend on the input only."""

    def __init__(self, config: Optional[ClassifierConfig] = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        c, h, w = config.in_shape
        layers: list[nn.Module] = []
        for out in config.channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c * h * w, config.feature_dim)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim)."""
        if tuple(x.shape[1:]) != tuple(self.config.in_shape):
            raise ValueError(f"classifier expects (N, {', '.join(map(str, self.config.in_shape))}) "
                             f"inputs in [-1, 1], got {tuple(x.shape)}")
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


# --------------------------------------------------------------------------------- training


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (background -1 fills the border)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n, h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n, w
    idx = torch.arange(n)[:, None, None]
    # advanced indices around a slice: the result is (n, h, w, c)
    return padded[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@dataclass(frozen=True)
class PGDSettings:
    """L2 projected gradient ascent on the loss (Madry et al.): ``steps`` normalised-gradient steps
    of ``step_size`` from the clean image, projected onto the ``eps`` ball and the pixel range."""

    eps: float
    steps: int = 7
    step_size: float = 0.0  # 0: 2.5 * eps / steps, the usual choice

    def __post_init__(self):
        if not self.eps > 0 or self.steps < 1 or self.step_size < 0:
            raise ValueError(f"PGD needs eps > 0, steps >= 1 and step size >= 0, got {self}")

    @property
    def alpha(self) -> float:
        return self.step_size or 2.5 * self.eps / self.steps


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pgd: PGDSettings) -> torch.Tensor:
    """Adversarial versions of ``x`` (in [-1, 1]) within L2 distance ``pgd.eps``. Only input
    gradients are taken; the model runs in eval mode (no dropout) during the attack."""
    was_training = model.training
    model.eval()
    delta = torch.zeros_like(x)
    try:
        for _ in range(pgd.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            delta = delta.detach() + pgd.alpha * grad / norm
            size = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
            delta = delta * (pgd.eps / size.clamp_min(1e-12)).clamp(max=1.0)
            delta = (x + delta).clamp(-1, 1) - x
    finally:
        model.train(was_training)
    return (x + delta).detach()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    model.train(was_training)
    return correct / max(len(images), 1)


@dataclass
class TrainResult:
    model: MnistClassifier
    heldout_accuracy: float
    train_accuracy: float
    seconds: float
    n_train: int
    n_heldout: int
    history: list[dict] = field(default_factory=list)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, keys: list[str], *,
                     epochs: int = 12, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     config: Optional[ClassifierConfig] = None, augment: bool = True,
                     adversary: Optional[PGDSettings] = None, log=print) -> TrainResult:
    """Adam with a cosine learning-rate decay over ``epochs`` on the 90% split, evaluated on the
    held-out 10% (by key hash) after every epoch. With ``adversary`` every batch is replaced by
    its L2 PGD adversarial examples (adversarial training)."""
    start = time.perf_counter()
    held = torch.tensor([heldout_key(k) for k in keys])
    x_tr, y_tr, x_te, y_te = images[~held], labels[~held], images[held], labels[held]
    if len(x_tr) == 0 or len(x_te) == 0:
        raise ValueError(f"the key-hash split left {len(x_tr)} training and {len(x_te)} "
                         "held-out samples; need some of each")
    torch.manual_seed(seed)
    config = config or ClassifierConfig(in_shape=tuple(images.shape[1:]),
                                        num_classes=max(10, int(labels.max()) + 1))
    model = MnistClassifier(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1))
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x = _shift(x_tr[idx], gen) if augment else x_tr[idx]
            if adversary is not None:
                x = pgd_l2(model, x, y_tr[idx], adversary)
            loss = F.cross_entropy(model(x), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc = accuracy(model, x_te, y_te)
        history.append({"epoch": epoch + 1, "loss": total / len(x_tr), "heldout_accuracy": acc,
                        "seconds": time.perf_counter() - start})
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(x_tr):.4f}, "
                f"held-out accuracy {acc:.4f} ({time.perf_counter() - start:.1f} s)")
    model.eval()
    return TrainResult(model, history[-1]["heldout_accuracy"] if history else accuracy(model, x_te, y_te),
                       accuracy(model, x_tr, y_tr), time.perf_counter() - start,
                       len(x_tr), len(x_te), history)


# ----------------------------------------------------------------------- save, load, register


def save_classifier(model: MnistClassifier, folder: str | os.PathLike,
                    extra: Optional[dict] = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (architecture + ``extra`` info) to folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "fdrl-mnist-classifier"})
    doc = {"architecture": asdict(model.config), **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=1))
    return folder


def classifier_from_bytes(config: bytes, weights: bytes) -> MnistClassifier:
    """A classifier in eval mode from the bytes of its config.json and model.safetensors."""
    from safetensors.torch import load as load_safetensors_bytes

    doc = json.loads(config)
    model = MnistClassifier(ClassifierConfig.from_dict(doc["architecture"]))
    model.load_state_dict(load_safetensors_bytes(weights))
    model.info = {k: v for k, v in doc.items() if k != "architecture"}
    return model.eval()


def load_classifier(folder: str | os.PathLike) -> MnistClassifier:
    """A classifier saved by ``save_classifier`` (model.safetensors + config.json), in eval mode.
    Registered classifiers (models:/...) load through ``fdrl.tracking.classifiers``."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"classifier not found: {folder} lacks {WEIGHTS_FILE} or {CONFIG_FILE} "
                                "(train one with jobs/train_classifier.py, or pass models:/NAME@ALIAS)")
    return classifier_from_bytes((folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes())
