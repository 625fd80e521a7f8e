"""Density-ratio networks: an MLP for 2D and the ResNets of the FDRL paper's table 3.

ResBlock = conv3x3 -> LeakyReLU(0.2) -> conv3x3, plus a shortcut (1x1 conv when the shape changes);
"Down" blocks use stride 2 in the first conv and the shortcut. No normalisation layers. The
head is global mean pooling and a dense layer to one output (r for LSIF, log r for LR).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

SLOPE = 0.2

# (stem channels, blocks as (channels, downsample) or "attn") for each architecture.
ARCHITECTURES: dict[str, dict] = {
    "cifar10": dict(in_shape=(3, 32, 32), stem=128, blocks=[
        (128, False)] * 3 + [(256, True)] + [(256, False)] * 2
        + [(256, True)] + [(256, False)] * 2 + [(256, True)] + [(256, False)] * 2),
    "celeba64": dict(in_shape=(3, 64, 64), stem=64, blocks=[
        (64, True), (128, True), (128, False), (256, True), (256, False), (256, True),
        (256, False)]),
    "church128": dict(in_shape=(3, 128, 128), stem=64, blocks=[
        (64, True), (128, True), (128, True), (128, False), (256, True), (256, False),
        (256, True), (256, False)]),
    "cat2dog64": dict(in_shape=(3, 64, 64), stem=64, blocks=[
        (64, True), (128, True), "attn", (128, True), (256, True)],
        spectral_norm=True),
    # Small net for the MNIST demo (1 x 32 x 32, after padding 28 -> 32).
    "mnist32": dict(in_shape=(1, 32, 32), stem=32, blocks=[
        (32, True), (64, True), (64, False), (128, True)]),
}


def check_input(x: torch.Tensor, in_shape: Sequence[int]) -> None:
    if x.dim() != len(in_shape) + 1 or tuple(x.shape[1:]) != tuple(in_shape):
        raise ValueError(
            f"network expects input of shape (batch, {', '.join(map(str, in_shape))}), "
            f"got {tuple(x.shape)}"
        )


class MLP(nn.Module):
    """Ratio estimator for 2D toys: ``depth`` hidden layers of ``width`` units."""

    def __init__(self, in_dim: int = 2, width: int = 64, depth: int = 3):
        super().__init__()
        self.in_shape = (in_dim,)
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LeakyReLU(SLOPE)]
            d = width
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_shape)
        return self.net(x).squeeze(-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        stride = 2 if down else 1
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.act = nn.LeakyReLU(SLOPE)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride) if down or cin != cout
                         else nn.Identity())

    def forward(self, x):
        return self.act(self.shortcut(x) + self.conv2(self.act(self.conv1(x))))


class SelfAttention(nn.Module):
    """SAGAN self-attention; the output gate starts at 0 so the block begins as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, 1)
        self.key = nn.Conv2d(channels, channels // 8, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # b, hw, c/8
        k = self.key(x).flatten(2)  # b, c/8, hw
        attn = torch.softmax(q @ k, dim=-1)  # b, hw, hw
        v = self.value(x).flatten(2)  # b, c, hw
        out = (v @ attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.gamma * out


class ResNetRatio(nn.Module):
    def __init__(self, in_shape: Sequence[int], stem: int, blocks: Sequence,
                 spectral_norm: bool = False, attention: bool = True):
        super().__init__()
        self.in_shape = tuple(in_shape)
        layers: list[nn.Module] = [nn.Conv2d(in_shape[0], stem, 3, 1, 1), nn.LeakyReLU(SLOPE)]
        ch = stem
        for spec in blocks:
            if spec == "attn":
                if attention:
                    layers.append(SelfAttention(ch))
                continue
            cout, down = spec
            layers.append(ResBlock(ch, cout, down))
            ch = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch, 1)
        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    _spectral_norm(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_shape)
        h = self.features(x).mean(dim=(2, 3))
        return self.head(h).squeeze(-1)


# The same family for any image shape: channels per stage; each stage is a "Down" ResBlock (a
# plain one once the feature map is 4x4) and a plain ResBlock, as in the paper's table 3.
NET_SIZES: dict[str, tuple[int, ...]] = {"s": (16, 32, 64), "m": (32, 64, 128),
                                         "l": (64, 128, 256)}
GENERIC = "resnet"  # arch strings "resnet:CxHxW:w1,w2,..." name a network of this family
MIN_FEATURE_SIZE = 4


def generic_arch(shape: Sequence[int], widths: Sequence[int]) -> str:
    """The arch string of the family's network for images of ``shape`` (C, H, W): it names
    everything needed to rebuild the network, so checkpoints and the registry need nothing else."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image shape must be (channels, height, width), got {tuple(shape)}")
    if not widths or min(widths) < 1:
        raise ValueError(f"network widths must be positive channel counts, got {list(widths)}")
    return f"{GENERIC}:{'x'.join(map(str, shape))}:{','.join(map(str, widths))}"


def _generic_spec(arch: str) -> dict:
    try:
        _, shape, widths = arch.split(":")
        in_shape = tuple(int(v) for v in shape.split("x"))
        chans = [int(v) for v in widths.split(",")]
    except ValueError:
        raise ValueError(f"bad network spec {arch!r}; expected {GENERIC}:CxHxW:w1,w2,...") from None
    blocks, size = [], min(in_shape[1:])
    for width in chans:
        down = size > MIN_FEATURE_SIZE
        size = (size + 1) // 2 if down else size
        blocks += [(width, down), (width, False)]
    return dict(in_shape=in_shape, stem=chans[0], blocks=blocks)


def build_network(arch: str, **overrides) -> nn.Module:
    """Build by name: "mlp", a key of ARCHITECTURES or a ``generic_arch`` string; ``overrides``
    replace its defaults."""
    if arch == "mlp":
        return MLP(**overrides)
    if arch.startswith(GENERIC + ":"):
        return ResNetRatio(**{**_generic_spec(arch), **overrides})
    if arch not in ARCHITECTURES:
        valid = ", ".join(["mlp", *ARCHITECTURES, f"{GENERIC}:CxHxW:w1,w2,..."])
        raise ValueError(f"unknown network architecture {arch!r}; valid: {valid}")
    return ResNetRatio(**{**ARCHITECTURES[arch], **overrides})


def network_input_shape(arch: str) -> tuple[int, ...]:
    """The input shape of ``arch`` without building it."""
    if arch.startswith(GENERIC + ":"):
        return _generic_spec(arch)["in_shape"]
    if arch in ARCHITECTURES:
        return tuple(ARCHITECTURES[arch]["in_shape"])
    return tuple(build_network(arch).in_shape)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
