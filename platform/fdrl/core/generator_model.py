"""A generator as data: its networks by role, rebuilt from JSON specs and weights, and the logit
DGflow reads from them.

* ``generator`` g: z -> x (always); ``discriminator`` d: x -> logit (or a vector critic) where
  there is one; ``encoder`` for a VAE; ``corrector`` d_lambda once a density-ratio corrector is
  trained (then the ratio is exp(-d) * exp(-d_lambda)).
* The config: kind (gan, vae, flow), the latent dimension (z ~ N(0, I)), the data shape, each
  network's spec (``core.generator_nets``) and free-form training info.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fdrl.core.dgflow import Logit
from fdrl.core.generator_nets import build_net


KINDS = ("gan", "vae", "flow")
ROLES = ("generator", "discriminator", "encoder", "corrector")


@dataclass
class GeneratorModel:
    kind: str
    latent_dim: int
    data_shape: tuple
    nets: dict[str, nn.Module]  # role -> module, eval mode, no parameter gradients
    specs: dict[str, dict]
    info: dict = field(default_factory=dict)
    name: str = ""
    version: str = ""
    run_id: str = ""

    @property
    def generator(self) -> nn.Module:
        return self.nets["generator"]

    def logit(self, use_corrector: bool = True) -> Logit:
        """The logit d (+ d_lambda): log of the ratio generator/data is its negative."""
        corrector = self.nets.get("corrector") if use_corrector else None
        if "discriminator" not in self.nets and corrector is None:
            raise ValueError(f"{self.ref} ({self.kind}) has no discriminator and no density-ratio "
                             "corrector: train one with jobs/train_corrector.py")
        disc = self.nets.get("discriminator")
        if disc is None:  # a corrector trained from scratch is the whole logit
            return Logit(corrector)
        if corrector is None and self.specs["discriminator"].get("out_dim", 1) != 1:
            raise ValueError(f"{self.ref} has a vector-valued critic; DGflow needs its "
                             "density-ratio corrector (jobs/train_corrector.py)")
        if corrector is not None and self.specs["discriminator"].get("out_dim", 1) != 1:
            return Logit(corrector)  # the corrector reads the ratio on its own
        return Logit(disc, corrector)

    @property
    def ref(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.name else "this generator"


def check_config(config: dict, nets: dict) -> None:
    if config.get("kind") not in KINDS:
        raise ValueError(f"unknown generator kind {config.get('kind')!r}; valid: {', '.join(KINDS)}")
    unknown = set(nets) - set(ROLES)
    if unknown or "generator" not in nets:
        raise ValueError(f"networks must include 'generator' and be among {', '.join(ROLES)}; "
                         f"got {', '.join(sorted(nets))}")
    if config["kind"] == "vae" and "encoder" not in nets:
        raise ValueError("a vae needs its encoder next to the decoder ('generator')")
    latent = int(config["latent_dim"])
    in_shape = tuple(getattr(nets["generator"], "in_shape", (latent,)))
    if in_shape != (latent,):
        raise ValueError(f"latent dimension mismatch: the config says {latent}, the generator "
                         f"takes {in_shape}")


def build_generator(config: dict, weights: dict[str, dict[str, torch.Tensor]]) -> GeneratorModel:
    """Rebuild every network from its spec and weights (the one place loaders build models)."""
    nets = {}
    for role, spec in config["nets"].items():
        net = build_net(spec)
        net.load_state_dict(weights[role])
        nets[role] = net.eval().requires_grad_(False)
    check_config(config, nets)
    return GeneratorModel(config["kind"], int(config["latent_dim"]), tuple(config["data_shape"]),
                          nets, dict(config["nets"]), dict(config.get("info", {})))
