"""The MLflow model registry for FDRL models: register a checkpoint, load it back safely, promote.

Flavour: a ``python_function`` (pyfunc) model logged with MLflow's "models from code"
(``python_model=`` the path of ``pyfunc_sampler.py``) whose ``predict({"n", "seed"})`` draws
samples. The weights (EMA network, safetensors), the prior (safetensors; none for the
parameter-free uniform/gaussian priors, which the config names) and the config (JSON) are the
model's ``artifacts``. Why this flavour:

* An MLflow user recognises it: it is the generic model type, it shows up as a Logged Model of the
  training run, and ``mlflow.pyfunc.load_model("models:/fdrl-mnist@champion").predict(...)``
  or ``mlflow models serve`` give samples. (It needs ``fdrl`` importable.)
* Nothing is cloudpickled. ``mlflow.pytorch`` would pickle the module (or export pt2), and a pyfunc
  *object* would be cloudpickled; here MLflow stores only source code and data files.
* ``load_fdrl_model`` never goes through pyfunc: it reads the three data files itself
  (safetensors, JSON) and executes nothing from the artifact store.

Tamper check: at registration the sha256 of every file we put in the model (weights, prior,
config, and the sampler source that pyfunc executes) is written as a tag ``sha256/<path in the
model>`` on the model version. Tags live in the registry database, the files in the artifact
store, so someone who can overwrite artifacts cannot also make them pass. ``load_fdrl_model``
hashes the bytes it downloaded and loads exactly those bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from torch import nn

from fdrl.config import TrainConfig
from fdrl.core.divergences import Pairing, get_pairing
from fdrl.core.networks import build_network
from fdrl.core.priors import Prior, model_prior
from fdrl.data import storage
from fdrl.data.hashing import sha256_file
from fdrl.core.flow import FlowSettings
from fdrl.core.chunks import CHUNK

log = logging.getLogger("fdrl.registry")

SAMPLER_CODE = Path(__file__).with_name("pyfunc_sampler.py")  # the "model from code"
WEIGHTS, PRIOR, CONFIG = "ema.safetensors", "prior.safetensors", "config.json"
ARTIFACT_DIR = "artifacts"  # where pyfunc puts ``artifacts`` inside the model directory
TAG = "sha256/"  # model version tag prefix: sha256/<path in the model> -> hex digest


class ModelNotFoundError(LookupError):
    """No such registered model, alias or version; the message lists what exists."""


class TamperedArtifactError(RuntimeError):
    """A downloaded model file does not match the sha256 recorded at registration."""


@dataclass
class LoadedModel:
    net: nn.Module  # the EMA ratio network, eval mode, no parameter gradients
    prior: Optional[Prior]  # None for translation: its prior is the source images given
    config: TrainConfig
    pairing: Pairing
    flow: FlowSettings  # K, kappa, eta, nu of the training config
    name: str
    version: str
    run_id: str


def build_model(weights: dict[str, torch.Tensor], prior_path: Optional[str | Path],
                config: dict) -> tuple[nn.Module, Prior, TrainConfig]:
    """Network, prior and config from plain data; the one place both loaders rebuild a model.
    ``prior_path`` is None for the parameter-free priors, which the config names."""
    cfg = TrainConfig.from_dict(config)
    net = build_network(cfg.arch)
    net.load_state_dict(weights)
    net.eval().requires_grad_(False)  # the flow needs input gradients only
    if cfg.prior == "source":  # translation: sampling flows given source images
        return net, None, cfg
    return net, model_prior(cfg.prior, net.in_shape, prior_path), cfg


def build_model_from_files(weights: str | Path, prior: Optional[str | Path],
                           config: str | Path) -> tuple[nn.Module, Prior, TrainConfig]:
    return build_model(load_file(str(weights)), prior, json.loads(Path(config).read_text()))


def _client(tracking_uri: Optional[str]):
    from mlflow.tracking import MlflowClient

    from fdrl.tracking.backend import default_tracking_uri

    return MlflowClient(tracking_uri or default_tracking_uri())


# ---------------------------------------------------------------- registering


def _signature(cfg: TrainConfig, shape: Sequence[int]):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    params = ParamSchema([ParamSpec("flow_steps", "long", cfg.flow_steps),
                          ParamSpec("extra_steps", "long", cfg.extra_steps),
                          ParamSpec("eta", "double", cfg.eta), ParamSpec("nu", "double", cfg.nu),
                          ParamSpec("batch", "long", CHUNK)])
    return ModelSignature(inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]),
                          params=params)


def _pip_requirements() -> list[str]:
    # Listed, not inferred: inference loads the model in a subprocess (slow). ``fdrl`` itself is
    # not on PyPI: a serving environment installs this repository.
    import mlflow
    import safetensors

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"safetensors=={safetensors.__version__}", "numpy", "pandas"]


def register_verified(run_id: str, name: str, files: Sequence[Path], code: Path, *, signature,
                      input_example, metadata: dict, tags: dict, tracking_uri: Optional[str] = None,
                      aliases: Sequence[str] = ("candidate",)):
    """The one register-and-verify path of every model kind (FDRL models, generators, classifiers):
    log ``files`` as the artifacts of a pyfunc "model from code" (``code``) in run ``run_id``,
    register it as a new version of ``name``, tag the sha256 of every file (and of ``code``, which
    pyfunc executes), then ``tags``, and only then point ``aliases`` at it, so a version reachable
    by alias always carries its tamper check. Returns the ``ModelVersion``."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from fdrl.tracking.backend import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    hashes = {f"{ARTIFACT_DIR}/{Path(p).name}": sha256_file(p) for p in files}
    hashes[code.name] = sha256_file(code)
    with _use_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(code), artifacts={Path(p).name: str(p) for p in files},
            signature=signature, input_example=input_example, pip_requirements=_pip_requirements(),
            registered_model_name=name, metadata=metadata)
    version = str(info.registered_model_version)
    client = _client(tracking_uri)
    for key, value in {**{TAG + k: v for k, v in hashes.items()}, **tags}.items():
        client.set_model_version_tag(name, version, key, str(value))
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return client.get_model_version(name, version)


def log_fdrl_model(run_id: str, checkpoint_dir: str | Path, prior_path: Optional[str | Path],
                   config: dict, name: str, tracking_uri: Optional[str] = None,
                   aliases: Sequence[str] = ("candidate",)):
    """Log the EMA network of ``checkpoint_dir`` with its prior and config as one pyfunc model in
    run ``run_id`` and register it (``register_verified``). Returns the ``ModelVersion``.
    ``prior_path`` is None for uniform/gaussian."""
    import pandas as pd

    checkpoint_dir = Path(checkpoint_dir)
    cfg = TrainConfig.from_dict(config)
    meta_path = checkpoint_dir / "meta.json"
    step = json.loads(meta_path.read_text()).get("step") if meta_path.exists() else None
    with tempfile.TemporaryDirectory(prefix="fdrl-register-") as tmp:
        stage = Path(tmp)
        files = {"weights": stage / WEIGHTS, "config": stage / CONFIG}
        shutil.copyfile(checkpoint_dir / WEIGHTS, files["weights"])
        files["config"].write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
        if prior_path:  # a local path or a URI
            files["prior"] = stage / PRIOR
            storage.get_file(prior_path, files["prior"])
        elif cfg.prior not in ("uniform", "gaussian", "source"):
            raise ValueError(f"prior {cfg.prior!r} is fitted: pass its .safetensors file")
        # Fail here, before anything is registered, if weights, prior and config do not fit.
        net, _, _ = build_model_from_files(files["weights"], files.get("prior"), files["config"])
        example = (pd.DataFrame({"n": [1], "seed": [0]}), {"flow_steps": 1, "extra_steps": 0})
        return register_verified(
            run_id, name, list(files.values()), SAMPLER_CODE,
            signature=_signature(cfg, net.in_shape), input_example=example,
            metadata={"fdrl_step": step, "fdrl_arch": cfg.arch, "fdrl_pairing": cfg.pairing},
            tags={"fdrl.step": str(step), "fdrl.arch": cfg.arch, "fdrl.pairing": cfg.pairing,
                  "fdrl.prior": cfg.prior, "fdrl.dataset": cfg.dataset},
            tracking_uri=tracking_uri, aliases=aliases)


def register_trained(cfg: TrainConfig, run_id: str, checkpoint_dir: str | Path) -> Optional[str]:
    """The training hook: register the final checkpoint of run ``run_id`` as ``candidate``;
    returns its models:/ URI. A finished training must not fail here, so every error becomes a
    warning and None."""
    name = cfg.register_name or f"fdrl-{cfg.dataset}"
    try:
        mv = log_fdrl_model(run_id, checkpoint_dir, cfg.prior_path or None,
                            cfg.to_dict(), name, cfg.tracking_uri or None)
    except Exception as err:  # noqa: BLE001 - any failure only costs the registration
        log.warning("could not register the model as %r (%s: %s); the checkpoint is still at %s",
                    name, type(err).__name__, err, checkpoint_dir)
        return None
    print(f"registered models:/{name}/{mv.version} with alias candidate")
    return f"models:/{name}@candidate"


def promote(name: str, version: str | int, alias: str = "champion",
            tracking_uri: Optional[str] = None):
    """Point ``alias`` (default ``champion``) at ``version``; returns that ``ModelVersion``."""
    client = _client(tracking_uri)
    mv = _resolve(client, name, version=str(version))
    client.set_registered_model_alias(name, alias, mv.version)
    return client.get_model_version(name, mv.version)


def record_evaluation(name: str, version: str, run_id: str, metrics: dict[str, float],
                      tracking_uri: Optional[str] = None) -> None:
    """Tag the model version with its evaluation run and final metrics (``eval_<metric>``)."""
    client = _client(tracking_uri)
    client.set_model_version_tag(name, version, "eval_run_id", run_id or "")
    for metric, value in metrics.items():
        client.set_model_version_tag(name, version, f"eval_{metric}", f"{value:.6g}")


def promote_if_better(name: str, version: str, metric: str, value: float,
                      tracking_uri: Optional[str] = None) -> bool:
    """Point ``champion`` at ``version`` when ``value`` (lower is better) beats the champion's
    recorded ``eval_<metric>`` (or there is no champion yet). Returns whether it moved."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        best = float(client.get_model_version_by_alias(name, "champion").tags.get(f"eval_{metric}", "inf"))
    except MlflowException:  # no champion yet
        best = float("inf")
    if value < best:
        promote(name, version, "champion", tracking_uri)
        return True
    return False


# ---------------------------------------------------------------- loading


def parse_model_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ValueError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    return name, None, version


def _resolve(client, name: str, alias: Optional[str] = None, version: Optional[str] = None):
    from mlflow.exceptions import MlflowException

    try:
        return (client.get_model_version_by_alias(name, alias) if alias
                else client.get_model_version(name, version))
    except MlflowException as err:
        lookup_error = err  # stores differ in the code they use; find out what is missing
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise ModelNotFoundError(f"no registered model {name!r}; registered models: "
                                 f"{', '.join(known) or 'none'}") from None
    versions = sorted(int(mv.version) for mv in client.search_model_versions(f"name='{name}'"))
    if (alias and alias in model.aliases) or (version and int(version) in versions):
        raise lookup_error  # it exists: the failure was something else
    aliases = ", ".join(f"{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
    what = f"alias {alias!r}" if alias else f"version {version}"
    raise ModelNotFoundError(f"model {name!r} has no {what}; its aliases: {aliases}; "
                             f"its versions: {', '.join(map(str, versions)) or 'none'}")


def _check(data: bytes, rel: str, expected: Optional[str], ref: str) -> bytes:
    """``data`` if it hashes to ``expected`` (the sha256 tag of ``rel``), else a refusal."""
    if expected is None:
        raise TamperedArtifactError(f"{ref} has no {TAG}{rel} tag: it was not registered by "
                                    f"fdrl.registry.log_fdrl_model and cannot be verified")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise TamperedArtifactError(
            f"{rel} of {ref} was modified after registration: sha256 {actual} does not match "
            f"the registered {expected}; refusing to load it")
    return data


@dataclass
class VerifiedVersion:
    """A registered version's artifacts, downloaded into ``folder``; ``read`` returns a file's
    bytes only after checking them against the version's sha256 tag."""
    name: str
    version: str
    run_id: str
    ref: str  # models:/NAME/VERSION, for messages
    hashes: dict  # artifact path in the model -> sha256 hex
    folder: Path  # a temporary folder, gone when the context exits
    local: Path

    def read(self, filename: str) -> bytes:  # the verified bytes are the ones that get loaded
        rel, path = f"{ARTIFACT_DIR}/{filename}", self.local / filename
        if not path.is_file():
            raise TamperedArtifactError(f"{rel} of {self.ref} is missing from the artifact store")
        return _check(path.read_bytes(), rel, self.hashes.get(rel), self.ref)

    def has(self, filename: str) -> bool:
        return f"{ARTIFACT_DIR}/{filename}" in self.hashes


def registered_version(client, uri: str):
    """(the model version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names, its sha256 tags
    as {path in the model: hex digest}). A missing version's error lists what exists."""
    name, alias, version = parse_model_uri(uri)
    mv = _resolve(client, name, alias, version)
    return mv, {k[len(TAG):]: v for k, v in mv.tags.items() if k.startswith(TAG)}


@contextmanager
def verified_version(uri: str, tracking_uri: Optional[str] = None) -> Iterator[VerifiedVersion]:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` and download its artifacts
    into a temporary folder, for reading through ``VerifiedVersion.read``."""
    from mlflow.artifacts import download_artifacts

    from fdrl.tracking.backend import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    client = _client(tracking_uri)
    mv, hashes = registered_version(client, uri)
    name = mv.name
    root = client.get_model_version_download_uri(name, mv.version).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="fdrl-load-") as tmp:
        local = Path(download_artifacts(artifact_uri=f"{root}/{ARTIFACT_DIR}", dst_path=tmp,
                                        tracking_uri=tracking_uri))
        yield VerifiedVersion(name, str(mv.version), mv.run_id or "", f"models:/{name}/{mv.version}",
                              hashes, Path(tmp), local)


def load_fdrl_model(uri: str, tracking_uri: Optional[str] = None) -> LoadedModel:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, download weights, prior and
    config, check each against its sha256 tag, and rebuild the model from safetensors + JSON.
    Nothing is unpickled and no code from the artifact store runs."""
    with verified_version(uri, tracking_uri) as found:
        weights = load_safetensors_bytes(found.read(WEIGHTS))
        config = json.loads(found.read(CONFIG))
        prior_file = None
        if found.has(PRIOR):  # parameter-free priors have no file
            prior_file = found.folder / "verified-prior.safetensors"
            prior_file.write_bytes(found.read(PRIOR))  # load_prior takes a path: write the checked bytes
        net, prior, cfg = build_model(weights, prior_file, config)
    return LoadedModel(net, prior, cfg, get_pairing(cfg.pairing),
                       FlowSettings.from_config(cfg), found.name, found.version, found.run_id)
