"""Networks of the generators DGflow refines, built from plain JSON specs (so a registered model
is data: safetensors + a spec, never pickled code).

* ``mlp``: fully connected ReLU net (the 2D WGAN-GP generator z -> x and critic x -> logit).
* ``dcgan_g`` / ``dcgan_d``: a small DCGAN for 1 x 32 x 32 MNIST, the discriminator spectrally
  normalised (SN-DCGAN); ``dcgan_d`` also serves as the VAE's corrector from scratch.
* ``vae_enc`` / ``vae_dec``: a small convolutional VAE on 1 x 32 x 32 (encoder -> mean, log var).

A spec is ``{"arch": NAME, **keyword arguments}``; ``build_net(spec)`` rebuilds the module.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def _logit_or_features(out):
    """One output per sample is a logit (shape N); more are a feature critic's vector (N x D)."""
    return out.squeeze(-1) if out.shape[-1] == 1 else out


class MLPNet(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, width: int = 512, depth: int = 3):
        super().__init__()
        self.in_shape, self.out_shape = (in_dim,), (out_dim,)
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return _logit_or_features(self.net(x))


class DCGANGenerator(nn.Module):
    """z (latent_dim) -> 1 x 32 x 32 in [-1, 1]."""

    def __init__(self, latent_dim: int = 64, width: int = 64):
        super().__init__()
        self.in_shape, self.out_shape = (latent_dim,), (1, 32, 32)
        self.width = width
        self.fc = nn.Linear(latent_dim, 4 * width * 4 * 4)
        self.net = nn.Sequential(
            nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, 1, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(self.fc(z).view(len(z), 4 * self.width, 4, 4))


class DCGANDiscriminator(nn.Module):
    """1 x 32 x 32 -> one logit, spectral norm on every layer (``out_dim`` > 1: a feature critic)."""

    def __init__(self, width: int = 64, out_dim: int = 1):
        super().__init__()
        self.in_shape, self.out_shape = (1, 32, 32), (out_dim,)
        sn = spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(1, width, 4, 2, 1)), nn.LeakyReLU(0.1),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.1),
            sn(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.1),
            nn.Flatten(), sn(nn.Linear(4 * width * 16, out_dim)))

    def forward(self, x):
        return _logit_or_features(self.net(x))


class VAEEncoder(nn.Module):
    """1 x 32 x 32 -> (mean, log variance) of q(z|x), concatenated: 2 * latent_dim outputs."""

    def __init__(self, latent_dim: int = 16, width: int = 32):
        super().__init__()
        self.in_shape, self.out_shape = (1, 32, 32), (2 * latent_dim,)
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * 64, 2 * latent_dim))

    def forward(self, x):
        return self.net(x)


class VAEDecoder(nn.Module):
    """z -> 1 x 32 x 32 in [-1, 1] (the mean of p(x|z))."""

    def __init__(self, latent_dim: int = 16, width: int = 32):
        super().__init__()
        self.in_shape, self.out_shape = (latent_dim,), (1, 32, 32)
        self.width = width
        self.fc = nn.Sequential(nn.Linear(latent_dim, 2 * width * 64), nn.ReLU())
        self.net = nn.Sequential(nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(width, 1, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(self.fc(z).view(len(z), 2 * self.width, 8, 8))


ARCHS = {"mlp": MLPNet, "dcgan_g": DCGANGenerator, "dcgan_d": DCGANDiscriminator,
         "vae_enc": VAEEncoder, "vae_dec": VAEDecoder}


def build_net(spec: dict) -> nn.Module:
    """The module a spec describes, in eval mode without parameter gradients."""
    if not isinstance(spec, dict) or spec.get("arch") not in ARCHS:
        arch = spec.get("arch") if isinstance(spec, dict) else spec
        raise ValueError(f"unknown network arch {arch!r}; valid: {', '.join(ARCHS)}")
    kwargs = {k: v for k, v in spec.items() if k != "arch"}
    try:
        net = ARCHS[spec["arch"]](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad network spec {spec}: {err}") from None
    return net.eval().requires_grad_(False)
