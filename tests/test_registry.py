"""The MLflow model registry for FDRL models: a real sqlite MLflow in tmp_path, no mocks.

Register -> load by alias in a fresh process (same weights, prior, config); tampered artifacts
are refused by their sha256 tags and never unpickled; aliases; the pyfunc flavour samples."""

import hashlib
import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from fdrl.data.checkpoint import save_checkpoint
from fdrl.config import TrainConfig
from fdrl.core.networks import build_network
from fdrl.core.priors import Moments, UniformPrior, fit_full
from fdrl.tracking.registry import (ModelNotFoundError, TamperedArtifactError, load_fdrl_model,
                           log_fdrl_model, promote)
from fdrl.tracking.tracker import Tracker
from fdrl.core.step import make_state

NAME = "fdrl-unit"


def make_checkpoint(root: Path, seed: int = 0, prior: str = "full"):
    """A random mnist32 network saved as a training checkpoint, its config and (fitted) prior."""
    torch.manual_seed(seed)
    state = make_state(build_network("mnist32"), lr=1e-3)
    cfg = TrainConfig(dataset="unit", arch="mnist32", prior=prior, flow_steps=2, extra_steps=1)
    ckpt = save_checkpoint(root / f"ckpt-{seed}-{prior}", state, cfg.to_dict(), [{}])
    prior_path = None
    if prior == "full":
        x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        prior_path = root / f"prior-{seed}.safetensors"
        fit_full(Moments.zeros(1024).update(x), (1, 32, 32), clamp=1.0).save(prior_path)
    return state, cfg, ckpt, prior_path


def digest(tensors) -> str:
    """sha256 over names, dtypes, shapes and bytes of a dict of tensors."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


FRESH_PROCESS = inspect.getsource(digest) + """
import hashlib, json, sys
from fdrl.tracking.registry import load_fdrl_model
m = load_fdrl_model(sys.argv[1], tracking_uri=sys.argv[2])
print(json.dumps({"net": digest(m.net.state_dict()), "prior": digest(m.prior.tensors()),
                  "prior_kind": m.prior.kind, "training": m.net.training,
                  "config": hashlib.sha256(json.dumps(m.config.to_dict(), sort_keys=True).encode()).hexdigest(),
                  "version": m.version, "run_id": m.run_id}))
"""


def load_in_fresh_process(uri: str, tracking_uri: str) -> dict:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, uri, tracking_uri], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    run_id = Tracker("unit", run_name="train", tracking_uri=uri).run_id
    state, cfg, ckpt, prior_path = make_checkpoint(root)
    mv = log_fdrl_model(run_id, ckpt, prior_path, cfg.to_dict(), NAME, uri)
    return dict(root=root, uri=uri, run_id=run_id, state=state, cfg=cfg, ckpt=ckpt,
                prior_path=prior_path, version=mv)


def _register(registry, seed: int, prior: str = "full", name: str = NAME):
    _, cfg, ckpt, prior_path = make_checkpoint(registry["root"], seed, prior)
    return log_fdrl_model(registry["run_id"], ckpt, prior_path, cfg.to_dict(), name,
                          registry["uri"])


def _stored_file(registry, name: str, version: str, rel: str) -> Path:
    """The file inside the artifact store (under the experiment's artifact location)."""
    root = MlflowClient(registry["uri"]).get_model_version_download_uri(name, version)
    assert root.startswith("file://") and "mlartifacts/unit" in root
    return Path(root[len("file://"):]) / rel


def test_round_trip_in_a_fresh_process(registry):
    from fdrl.core.priors import load_prior

    got = load_in_fresh_process(f"models:/{NAME}@candidate", registry["uri"])
    prior = load_prior(registry["prior_path"])
    assert got["net"] == digest(registry["state"].ema.state_dict())
    assert got["prior"] == digest(prior.tensors()) and got["prior_kind"] == "full"
    want = hashlib.sha256(json.dumps(registry["cfg"].to_dict(), sort_keys=True).encode())
    assert got["config"] == want.hexdigest()
    assert got["training"] is False
    assert got["version"] == str(registry["version"].version)
    assert got["run_id"] == registry["run_id"]


def test_model_is_one_logged_model_of_the_run_with_hash_tags(registry):
    client = MlflowClient(registry["uri"])
    mv = client.get_model_version(NAME, registry["version"].version)
    assert mv.run_id == registry["run_id"] and mv.source.startswith("models:/m-")
    hashes = {k: v for k, v in mv.tags.items() if k.startswith("sha256/")}
    assert set(hashes) == {"sha256/artifacts/ema.safetensors", "sha256/artifacts/prior.safetensors",
                           "sha256/artifacts/config.json", "sha256/pyfunc_sampler.py"}
    for key, value in hashes.items():
        stored = _stored_file(registry, NAME, mv.version, key[len("sha256/"):])
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == value
    run = client.get_run(registry["run_id"])
    assert [o.model_id for o in run.outputs.model_outputs] == [mv.source[len("models:/"):]]


@pytest.mark.parametrize("payload", ["other-weights", "pickle"])
def test_tampered_weights_are_refused(registry, tmp_path, payload):
    mv = _register(registry, seed=10 + len(payload), name="fdrl-tamper")  # NAME's aliases stay
    target = _stored_file(registry, "fdrl-tamper", mv.version, "artifacts/ema.safetensors")
    marker = tmp_path / "unpickled"
    if payload == "pickle":  # a pickle that would leave a marker if anything unpickled it
        class Boom:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)
        target.write_bytes(pickle.dumps(Boom()))
    else:  # a valid safetensors file with other weights
        _, _, other, _ = make_checkpoint(tmp_path, seed=99)
        target.write_bytes((other / "ema.safetensors").read_bytes())
    with pytest.raises(TamperedArtifactError,
                       match=r"artifacts/ema.safetensors of models:/fdrl-tamper/\d+ was modified "
                             r"after registration: sha256 [0-9a-f]{64} does not match"):
        load_fdrl_model(f"models:/fdrl-tamper/{mv.version}", registry["uri"])
    assert not marker.exists()


def test_tampered_config_is_refused(registry):
    mv = _register(registry, seed=20, name="fdrl-tamper")
    target = _stored_file(registry, "fdrl-tamper", mv.version, "artifacts/config.json")
    target.write_text(target.read_text().replace('"pairing": "lsif-chi2"', '"pairing": "lr-kl"'))
    with pytest.raises(TamperedArtifactError, match="artifacts/config.json .* was modified"):
        load_fdrl_model(f"models:/fdrl-tamper/{mv.version}", registry["uri"])


def test_loader_never_unpickles(registry, monkeypatch):
    import cloudpickle

    def refuse(*args, **kwargs):
        raise AssertionError("the loader unpickled something")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for module, attr in [(pickle, "load"), (pickle, "loads"), (cloudpickle, "load"),
                         (cloudpickle, "loads")]:
        monkeypatch.setattr(module, attr, refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    real_torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: refuse() if not k.get("weights_only")
                        else real_torch_load(*a, **k))
    model = load_fdrl_model(f"models:/{NAME}/{registry['version'].version}", registry["uri"])
    assert model.name == NAME and model.config.arch == "mnist32"


def test_aliases_and_promotion(registry):
    client = MlflowClient(registry["uri"])
    name = "fdrl-aliases"
    v1 = _register(registry, seed=30, name=name)
    assert v1.aliases == ["candidate"]
    promote(name, v1.version, tracking_uri=registry["uri"])
    v2 = _register(registry, seed=31, name=name)
    assert client.get_model_version_by_alias(name, "candidate").version == v2.version
    assert client.get_model_version_by_alias(name, "champion").version == v1.version
    champion = load_fdrl_model(f"models:/{name}@champion", registry["uri"])
    assert champion.version == str(v1.version)
    with pytest.raises(ModelNotFoundError, match=r"model 'fdrl-aliases' has no alias 'prod'; "
                       r"its aliases: candidate -> v2, champion -> v1; its versions: 1, 2"):
        load_fdrl_model(f"models:/{name}@prod", registry["uri"])
    with pytest.raises(ModelNotFoundError, match="has no version 7; .*its versions: 1, 2"):
        promote(name, 7, tracking_uri=registry["uri"])
    with pytest.raises(ModelNotFoundError, match="no registered model 'nope'; registered models: "
                                                 ".*fdrl-aliases.*fdrl-unit"):
        load_fdrl_model("models:/nope@champion", registry["uri"])


def test_parameter_free_prior_has_no_file(registry):
    mv = _register(registry, seed=40, prior="uniform", name="fdrl-uniform")
    assert not any("prior" in k for k in mv.tags if k.startswith("sha256/"))
    model = load_fdrl_model("models:/fdrl-uniform@candidate", registry["uri"])
    assert isinstance(model.prior, UniformPrior) and model.prior.shape == (1, 32, 32)
    _, cfg, ckpt, _ = make_checkpoint(registry["root"], 41)
    with pytest.raises(ValueError, match="prior 'full' is fitted: pass its .safetensors file"):
        log_fdrl_model(registry["run_id"], ckpt, None, cfg.to_dict(), "fdrl-x", registry["uri"])


def test_training_hook_warns_instead_of_failing(registry, caplog):
    from fdrl.tracking.registry import register_trained

    _, cfg, ckpt, _ = make_checkpoint(registry["root"], 60)
    cfg.tracking_uri = registry["uri"]
    cfg.prior_path = ""  # a fitted prior without its file cannot be registered
    assert register_trained(cfg, registry["run_id"], ckpt) is None
    assert "could not register the model as 'fdrl-unit'" in caplog.text
    cfg.prior, cfg.register_name = "uniform", "fdrl-hook"
    assert register_trained(cfg, registry["run_id"], ckpt) == "models:/fdrl-hook@candidate"


def test_pyfunc_flavour_draws_the_same_samples_as_the_library(registry):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from fdrl.core.flow import FlowSettings
    from fdrl.core.sampler import sample

    with _use_tracking_uri(registry["uri"]):  # the MLflow user's path: pyfunc by alias
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    x = pyfunc.predict(pd.DataFrame({"n": [5, 3], "seed": [7, 8]}), params={"batch": 4})
    assert x.shape == (8, 1, 32, 32) and x.dtype == np.float32
    model = load_fdrl_model(f"models:/{NAME}@candidate", registry["uri"])
    flow = FlowSettings.from_config(model.config)
    want = np.concatenate([sample(model.net, model.pairing, flow, n, seed, prior=model.prior,
                                  chunk=4).x.clamp(-1, 1).numpy() for n, seed in ((5, 7), (3, 8))])
    np.testing.assert_array_equal(x, want)  # same chunk seeds, same process


def test_register_job_registers_and_promotes(registry, capsys, load_job):
    job = load_job("register")
    _, _, ckpt, prior_path = make_checkpoint(registry["root"], 50)
    assert job.main(["--checkpoint", str(ckpt), "--prior", str(prior_path), "--name", "fdrl-job",
                     "--experiment", "by-hand", "--tracking-uri", registry["uri"]]) == 0
    assert "models:/fdrl-job@candidate" in capsys.readouterr().out
    assert job.main(["--name", "fdrl-job", "--promote", "1", "--tracking-uri", registry["uri"]]) == 0
    client = MlflowClient(registry["uri"])
    mv = client.get_model_version_by_alias("fdrl-job", "champion")
    assert str(mv.version) == "1" and client.get_run(mv.run_id).info.run_name == "register-fdrl-job"
