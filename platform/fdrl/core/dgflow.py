"""DGflow (refining a trained generator with its discriminator) and its baselines DOT and DDLS.

A discriminator logit d estimates the ratio generator/data as exp(-d(x)) (d high on data). With
o = log r = -d, DGflow's update  x <- x - eta grad f'(exp(-d(x))) + sqrt(2 eta gamma) xi  is
exactly FDRL's flow under the LR pairings: f = kl, js, logd use f'(o) = o, logsig(o), -logsig(-o)
(velocity s * grad d with s = 1, sigmoid(d), sigmoid(-d)). So every method here runs through the
one sampler (``core.sampler.sample_chunk``): chunk i draws its latents from the generator seeded
by (seed, i), then its noise; a sample never depends on the batch size or the worker count.

* ``data`` space: the state is x; the chunk's "prior" is the pushforward g(z), z ~ N(0, I).
* ``latent`` space (Algorithm 1): the state is z and the potential is f'(exp(-d(g(z)))).
* DDLS: Langevin in latent space on E(z) = |z|^2 / 2 - d(g(z)), step eps, noise scale 0.1.
* DOT: per sample, Adam on |x - y + delta| - d(x) / k_eff from y = g(z) (Tanaka 2019).

A density-ratio corrector d_lambda adds to the logit: ratio = exp(-d_phi) * exp(-d_lambda).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.priors import Prior
from fdrl.core.chunks import CHUNK, Chunk, Samples, chunk_seed, run_chunks
from fdrl.core.sampler import sample_chunk

F_NAMES = ("kl", "js", "logd")
METHODS = ("dgflow", "dot", "ddls")
SPACES = ("latent", "data")


@dataclass(frozen=True)
class RefineSettings:
    """One refinement: the method, f, the space it runs in, steps, step size and noise."""

    method: str = "dgflow"
    f: str = "kl"
    space: str = "latent"
    steps: int = 25
    eta: float = 0.1  # DGflow step; DDLS: Langevin step eps; DOT: Adam lr
    gamma: float = 0.01  # DGflow: noise sqrt(2 eta gamma); DDLS: noise scale (x sqrt(eps))

    def __post_init__(self):
        for value, valid, what in ((self.method, METHODS, "method"), (self.f, F_NAMES, "f"),
                                   (self.space, SPACES, "space")):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not self.eta > 0:
            raise ValueError(f"eta (step size) must be > 0, got {self.eta!r}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma (noise) must be >= 0, got {self.gamma!r}")
        if self.method == "ddls" and self.space != "latent":
            raise ValueError("DDLS samples the latent energy |z|^2/2 - d(g(z)): use space='latent'")
        if self.method == "dot" and self.space != "data":
            raise ValueError("DOT transports samples in data space: use space='data'")


def paper_settings(method: str, f: str = "kl", space: Optional[str] = None,
                   gamma: Optional[float] = None, steps: Optional[int] = None) -> RefineSettings:
    """The paper's 2D settings (REFERENCE.md): DGflow eta 0.01, 100 steps, gamma 0.01, data space;
    DOT 100 Adam steps lr 0.01 in data space; DDLS 50 Langevin steps of 0.01, noise x 0.1, latent."""
    base = {"dgflow": dict(space="data", steps=100, eta=0.01, gamma=0.01),
            "dot": dict(space="data", steps=100, eta=0.01, gamma=0.0),
            "ddls": dict(space="latent", steps=50, eta=0.01, gamma=0.1)}
    if method not in base:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    cfg = dict(base[method], method=method, f=f)
    cfg.update({k: v for k, v in dict(space=space, gamma=gamma, steps=steps).items() if v is not None})
    return RefineSettings(**cfg)


class Logit(nn.Module):
    """d(x) of a discriminator, plus an optional corrector's d_lambda(x): shape (batch,).
    A vector-valued critic is not a logit; it needs a corrector with a scalar head."""

    def __init__(self, discriminator: nn.Module, corrector: Optional[nn.Module] = None):
        super().__init__()
        self.discriminator, self.corrector = discriminator, corrector

    def forward(self, x):
        d = _scalar(self.discriminator(x), "discriminator")
        if self.corrector is not None:
            d = d + _scalar(self.corrector(x), "corrector")
        return d


def _scalar(out: torch.Tensor, what: str) -> torch.Tensor:
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() != 1:
        raise ValueError(f"the {what} returns shape {tuple(out.shape)}, not one logit per sample; "
                         "a vector-valued critic needs a density-ratio corrector (train_corrector.py)")
    return out


class LogRatio(nn.Module):
    """o = log r = -d(g(z)) (latent) or -d(x) (data): the network the one sampler's flow drives."""

    def __init__(self, logit: nn.Module, generator: Optional[nn.Module] = None):
        super().__init__()
        self.logit, self.generator = logit, generator

    def forward(self, state):
        x = state if self.generator is None else self.generator(state)
        return -self.logit(x)


class GaussianLatent(Prior):
    """z ~ N(0, I) of a generator's latent space."""

    kind = "gaussian"

    def _sample_flat(self, n, generator, device):
        return torch.randn(n, self.dim, generator=generator, device=device)


class Pushforward(Prior):
    """g(z), z ~ N(0, I): the base samples in data space, drawn with the chunk's generator."""

    kind = "pushforward"

    def __init__(self, generator: nn.Module, latent_dim: int, data_shape: Sequence[int]):
        super().__init__(data_shape)
        self.generator, self.latent = generator, GaussianLatent((latent_dim,))

    def sample(self, n, generator=None, device="cpu"):
        with torch.no_grad():
            return self.generator(self.latent.sample(n, generator, device)).reshape(n, *self.shape)


def refine_chunk(settings: RefineSettings, logit: nn.Module, seed: int, index: int, size: int, *,
                 generator: Optional[nn.Module] = None, latent_dim: Optional[int] = None,
                 data_shape: Optional[Sequence[int]] = None, start: Optional[torch.Tensor] = None,
                 k_eff: Optional[float] = None) -> Samples:
    """Chunk ``index`` (``size`` samples) of a refinement run seeded with ``seed``: the refined
    samples ``x``, the unrefined ones (same latents) as ``stages[0]``, both in data space, and the
    mean log-ratio estimate (-d) at steps 0..steps as ``log_r``. ``start`` (data space only)
    replaces the generator's draws: refining given samples."""
    if settings.space == "latent" or start is None:
        if generator is None or latent_dim is None:
            raise ValueError("refining without --input samples needs a generator and its latent_dim")
    if settings.space == "latent" and start is not None:
        raise ValueError("given samples have no latents: refine them with space='data'")
    if settings.method == "dot":
        return _dot_chunk(settings, logit, seed, index, size, generator, latent_dim, data_shape,
                          start, k_eff)
    flow = FlowSettings(settings.steps, 0, *_step_and_noise(settings))
    if settings.space == "latent":
        net = LogRatio(logit, generator)
        prior = GaussianLatent((latent_dim,))
        extra = (lambda z, _out: 0.5 * z.flatten(1).pow(2).sum(1)) if settings.method == "ddls" else None
    else:
        net = LogRatio(logit)
        prior = None if start is not None else Pushforward(generator, latent_dim, data_shape)
        extra = None
    f = "kl" if settings.method == "ddls" else settings.f  # DDLS: the energy itself, f'(o) = o
    out = sample_chunk(net, get_pairing(f"lr-{f}"), flow, seed, index, size, prior=prior,
                       start=start, record=(0,), trace=True, extra_potential=extra)
    if settings.space == "latent":
        with torch.no_grad():
            return Samples(generator(out.x), {0: generator(out.stages[0])}, out.log_r)
    return out


def _step_and_noise(s: RefineSettings) -> tuple[float, float]:
    """(eta, nu) of the flow x <- x - eta grad P + nu xi for DGflow and DDLS."""
    if s.method == "ddls":  # z <- z - eps/2 grad E + scale sqrt(eps) xi
        return s.eta / 2, s.gamma * math.sqrt(s.eta)
    return s.eta, math.sqrt(2 * s.eta * s.gamma)


DOT_DELTA = 1e-3  # keeps |x - y + delta| differentiable at x = y (Tanaka's choice)


def lipschitz_estimate(logit: nn.Module, x: torch.Tensor, pairs: int = 4096, seed: int = 0) -> float:
    """k_eff for DOT: the largest |d(a) - d(b)| / |a - b| over random pairs of ``x``."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(len(x), (pairs,), generator=gen)
    j = torch.randint(len(x), (pairs,), generator=gen)
    keep = i != j
    with torch.no_grad():
        d = logit(x)
        dist = (x[i[keep]] - x[j[keep]]).flatten(1).norm(dim=1).clamp_min(1e-8)
        return float(((d[i[keep]] - d[j[keep]]).abs() / dist).max())


def _dot_chunk(s, logit, seed, index, size, generator, latent_dim, data_shape, start, k_eff):
    if k_eff is None or not k_eff > 0:
        raise ValueError(f"DOT needs the critic's Lipschitz estimate k_eff > 0, got {k_eff!r}")
    gen = torch.Generator().manual_seed(chunk_seed(seed, index))
    y = (start.float() if start is not None
         else Pushforward(generator, latent_dim, data_shape).sample(size, gen))
    x = y.clone().requires_grad_(True)
    # Adam is elementwise and the loss is a sum over samples: each sample is optimised on its own.
    opt = torch.optim.Adam([x], lr=s.eta, betas=(0.0, 0.9))
    curve = []
    for _ in range(s.steps):
        d = logit(x)
        curve.append(-d.detach().mean())
        loss = ((x - y + DOT_DELTA).flatten(1).norm(dim=1) - d / k_eff).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        curve.append(-logit(x).mean())
    return Samples(x.detach(), {0: y}, torch.stack(curve))


def refine(settings: RefineSettings, logit: nn.Module, n: Optional[int] = None, seed: int = 0, *,
           generator: Optional[nn.Module] = None, latent_dim: Optional[int] = None,
           data_shape: Optional[Sequence[int]] = None, start: Optional[torch.Tensor] = None,
           k_eff: Optional[float] = None, chunk: int = CHUNK) -> Samples:
    """N refined samples in this process, chunk by chunk (``refine_chunk``, merged)."""
    if start is not None:
        n = len(start) if n is None else n
        if n != len(start):
            raise ValueError(f"n={n} but {len(start)} samples were given")
    if n is None or n < 1:
        raise ValueError(f"give n >= 1 or samples to refine, got n={n}")

    def one(c: Chunk) -> Samples:
        return refine_chunk(settings, logit, seed, c.index, c.size, generator=generator,
                            latent_dim=latent_dim, data_shape=data_shape, k_eff=k_eff,
                            start=None if start is None else start[c.start:c.start + c.size])

    return run_chunks(one, n, chunk)


def auto_steps(curve: Sequence[float], tol: float, patience: int = 5) -> int:
    """The step count after which the mean log-ratio estimate stops improving: the first k at which
    it fell by less than ``tol`` over the last ``patience`` steps (the curve's length - 1 if never)."""
    values = [float(v) for v in curve]
    for k in range(patience, len(values)):
        if values[k - patience] - values[k] < tol:
            return max(k - patience, 1)
    return len(values) - 1


class ChunkRefiner:
    """One refinement's settings and networks on one device (a CPU here: the networks are small),
    refining whole chunks: what each Ray actor of a distributed refinement holds."""

    def __init__(self, device, settings: RefineSettings, logit: nn.Module,
                 generator: Optional[nn.Module], latent_dim: Optional[int],
                 data_shape: Optional[Sequence[int]], k_eff: Optional[float]):
        self.settings, self.logit, self.generator = settings, logit, generator
        self.latent_dim, self.data_shape, self.k_eff = latent_dim, data_shape, k_eff

    def refine(self, seed: int, chunk: Chunk, start: Optional[torch.Tensor] = None) -> Samples:
        return refine_chunk(self.settings, self.logit, seed, chunk.index, chunk.size,
                            generator=self.generator, latent_dim=self.latent_dim,
                            data_shape=self.data_shape, start=start, k_eff=self.k_eff)


def refine_item(refiner: ChunkRefiner, item: tuple) -> Samples:
    """The fan-out's work: ``item`` is ``ChunkRefiner.refine``'s arguments."""
    return refiner.refine(*item)
