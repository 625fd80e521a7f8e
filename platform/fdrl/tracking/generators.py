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
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from fdrl.core.generator_model import GeneratorModel, build_generator, check_config
from fdrl.tracking.registry import (ARTIFACT_DIR, TAG, TamperedArtifactError, register_verified,
                                    verified_version)

CONFIG = "generator.json"
CODE = Path(__file__).with_name("generator_pyfunc.py")


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
    """Log the networks as one pyfunc model of run ``run_id`` and register it
    (``registry.register_verified``). Returns the ``ModelVersion``."""
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    with tempfile.TemporaryDirectory(prefix="fdrl-generator-") as tmp:
        files = save_generator(tmp, kind, latent_dim, data_shape, nets, info)
        signature = ModelSignature(
            inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *data_shape))]))
        return register_verified(
            run_id, name, list(files.values()), CODE, signature=signature,
            input_example=pd.DataFrame({"n": [1], "seed": [0]}),
            metadata={"fdrl_generator_kind": kind, "roles": sorted(nets)},
            tags={"fdrl.kind": kind, "fdrl.roles": ",".join(sorted(nets)),
                  "fdrl.latent_dim": str(latent_dim)},
            tracking_uri=tracking_uri, aliases=aliases)


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
