"""Registered generators (GANs, VAEs, flows) that DGflow refines: MLflow models stored as data.

A generator model version holds one safetensors file per network and one JSON config:
* ``generator`` g: z -> x (always); ``discriminator`` d: x -> logit (or a vector critic) where
  there is one; ``encoder`` for a VAE; ``corrector`` d_lambda once a density-ratio corrector is
  trained (then the ratio is exp(-d) * exp(-d_lambda));
* ``generator.json``: kind (gan, vae, flow), latent prior (N(0, I) of ``latent_dim``), the data
  shape, each network's spec (``core.generator_nets``) and free-form training info.

As for FDRL models (``tracking.registry``), the flavour is a pyfunc "model from code"
(``generator_pyfunc.py``: ``predict({"n", "seed"})`` returns g(z)), the sha256 of every file is a
tag on the model version, and ``load_generator`` checks each downloaded file against it, reads
safetensors and JSON, and never unpickles.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from fdrl.core.dgflow import Logit
from fdrl.core.generator_nets import build_net
from fdrl.data.hashing import sha256_file
from fdrl.tracking.registry import (ARTIFACT_DIR, TAG, TamperedArtifactError, _client,
                                    _pip_requirements, verified_version)

KINDS = ("gan", "vae", "flow")
ROLES = ("generator", "discriminator", "encoder", "corrector")
CONFIG = "generator.json"
CODE = Path(__file__).with_name("generator_pyfunc.py")


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


def save_generator(out_dir: str | Path, kind: str, latent_dim: int, data_shape: Sequence[int],
                   nets: dict[str, tuple[dict, nn.Module]], info: Optional[dict] = None) -> dict:
    """Write ``<role>.safetensors`` per network and ``generator.json`` into ``out_dir``;
    returns {file name: path}. ``nets``: role -> (spec, module)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"kind": kind, "latent_dim": int(latent_dim), "prior": "gaussian",
              "data_shape": [int(s) for s in data_shape],
              "nets": {role: spec for role, (spec, _) in nets.items()}, "info": info or {}}
    check_config(config, {role: net for role, (_, net) in nets.items()})
    files = {}
    for role, (_, net) in nets.items():
        path = out / f"{role}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(path))
        files[path.name] = path
    (out / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
    files[CONFIG] = out / CONFIG
    # Fail before registering anything if the files do not rebuild the networks.
    build_generator(config, {r: _load(files[f"{r}.safetensors"].read_bytes()) for r in nets})
    return files


def _load(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(data)
    except Exception as err:  # noqa: BLE001 - any parse failure means "not safetensors"
        raise TamperedArtifactError(f"not a safetensors file ({type(err).__name__}: {err}); "
                                    "refusing to load anything else") from None


def log_generator(run_id: str, name: str, kind: str, latent_dim: int, data_shape: Sequence[int],
                  nets: dict[str, tuple[dict, nn.Module]], info: Optional[dict] = None,
                  tracking_uri: Optional[str] = None, aliases: Sequence[str] = ("candidate",)):
    """Log the networks as one pyfunc model of run ``run_id``, register it as a new version of
    ``name``, tag every file's sha256, then set ``aliases``. Returns the ``ModelVersion``."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import ColSpec, Schema, TensorSpec
    import numpy as np

    from fdrl.tracking.tracker import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="fdrl-generator-") as tmp:
        files = save_generator(tmp, kind, latent_dim, data_shape, nets, info)
        hashes = {f"{ARTIFACT_DIR}/{n}": sha256_file(p) for n, p in files.items()}
        hashes[CODE.name] = sha256_file(CODE)
        signature = ModelSignature(
            inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *data_shape))]))
        with _use_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            logged = mlflow.pyfunc.log_model(
                name=name, python_model=str(CODE), artifacts={n: str(p) for n, p in files.items()},
                signature=signature, input_example=pd.DataFrame({"n": [1], "seed": [0]}),
                pip_requirements=_pip_requirements(), registered_model_name=name,
                metadata={"fdrl_generator_kind": kind, "roles": sorted(nets)})
    version = str(logged.registered_model_version)
    client = _client(tracking_uri)
    tags = {**{TAG + k: v for k, v in hashes.items()}, "fdrl.kind": kind,
            "fdrl.roles": ",".join(sorted(nets)), "fdrl.latent_dim": str(latent_dim)}
    for key, value in tags.items():  # hashes before aliases, as for FDRL models
        client.set_model_version_tag(name, version, key, value)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return client.get_model_version(name, version)


def load_generator(uri: str, tracking_uri: Optional[str] = None) -> GeneratorModel:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, check every file against its
    sha256 tag, rebuild the networks from safetensors + JSON. Nothing is unpickled."""
    with verified_version(uri, tracking_uri) as found:
        if not found.has(CONFIG):
            raise TamperedArtifactError(f"{found.ref} has no {TAG}{ARTIFACT_DIR}/{CONFIG} tag: it is "
                                        "not a generator registered by fdrl.tracking.generators")
        config = json.loads(found.read(CONFIG))
        weights = {role: _load(found.read(f"{role}.safetensors")) for role in config["nets"]}
    model = build_generator(config, weights)
    model.name, model.version, model.run_id = found.name, found.version, found.run_id
    return model
