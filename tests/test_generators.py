"""Registered generators (fdrl.tracking.generators) in a real sqlite MLflow: bit-exact round trip,
tampered or pickled artifacts refused, bad configs named, the pyfunc flavour draws g(z)."""

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from fdrl.core.generator_nets import build_net
from fdrl.tracking.generators import load_generator, log_generator, save_generator
from fdrl.tracking.registry import TamperedArtifactError
from fdrl.tracking.tracker import Tracker

G_SPEC = {"arch": "mlp", "in_dim": 2, "out_dim": 2, "width": 32, "depth": 2}
D_SPEC = {"arch": "mlp", "in_dim": 2, "out_dim": 1, "width": 32, "depth": 2}


def random_nets(seed, d_spec=D_SPEC):
    torch.manual_seed(seed)
    g, d = build_net(G_SPEC), build_net(d_spec)
    for p in list(g.parameters()) + list(d.parameters()):
        p.data.normal_()
    return {"generator": (G_SPEC, g), "discriminator": (d_spec, d)}


def digest(net):
    h = hashlib.sha256()
    for k, t in sorted(net.state_dict().items()):
        h.update(k.encode()), h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("generators")
    uri = f"sqlite:///{root}/mlflow.db"
    run_id = Tracker("gen-unit", run_name="train-gan", tracking_uri=uri).run_id
    return dict(root=root, uri=uri, run_id=run_id)


def register(store, name, seed=0, **kw):
    nets = kw.pop("nets", None) or random_nets(seed)
    mv = log_generator(store["run_id"], name, "gan", 2, (2,), nets, info={"seed": seed},
                       tracking_uri=store["uri"], **kw)
    return mv, nets


def stored(store, name, version, filename) -> Path:
    root = MlflowClient(store["uri"]).get_model_version_download_uri(name, version)
    return Path(root[len("file://"):]) / "artifacts" / filename


def test_round_trip_is_bit_exact(store):
    mv, nets = register(store, "gan-unit")
    model = load_generator("models:/gan-unit@candidate", store["uri"])
    assert model.kind == "gan" and model.latent_dim == 2 and model.data_shape == (2,)
    assert model.version == str(mv.version) and model.run_id == store["run_id"]
    for role in ("generator", "discriminator"):
        assert digest(model.nets[role]) == digest(nets[role][1])
        assert not model.nets[role].training
    z = torch.randn(5, 2)
    assert torch.equal(model.generator(z), nets["generator"][1](z))
    assert model.info == {"seed": 0}


@pytest.mark.parametrize("payload", ["other-weights", "pickle"])
def test_tampered_or_pickled_weights_are_refused(store, tmp_path, payload):
    mv, _ = register(store, "gan-tamper", seed=3)
    target = stored(store, "gan-tamper", mv.version, "discriminator.safetensors")
    marker = tmp_path / "unpickled"
    if payload == "pickle":
        class Boom:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)
        target.write_bytes(pickle.dumps(Boom()))
    else:
        files = save_generator(tmp_path / "other", "gan", 2, (2,), random_nets(99))
        target.write_bytes(files["discriminator.safetensors"].read_bytes())
    with pytest.raises(TamperedArtifactError, match=r"discriminator.safetensors of "
                       r"models:/gan-tamper/\d+ was modified after registration"):
        load_generator(f"models:/gan-tamper/{mv.version}", store["uri"])
    assert not marker.exists()


def test_pickle_is_refused_even_with_a_matching_hash_tag(store, tmp_path):
    # Someone who can also rewrite the registry's tags still gets nothing unpickled.
    mv, _ = register(store, "gan-pickle", seed=4)
    target = stored(store, "gan-pickle", mv.version, "generator.safetensors")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    target.write_bytes(pickle.dumps(Boom()))
    MlflowClient(store["uri"]).set_model_version_tag(
        "gan-pickle", mv.version, "sha256/artifacts/generator.safetensors",
        hashlib.sha256(target.read_bytes()).hexdigest())
    with pytest.raises(TamperedArtifactError, match="not a safetensors file"):
        load_generator(f"models:/gan-pickle/{mv.version}", store["uri"])
    assert not marker.exists()


def test_tampered_config_is_refused(store):
    mv, _ = register(store, "gan-config", seed=5)
    target = stored(store, "gan-config", mv.version, "generator.json")
    target.write_text(target.read_text().replace('"kind": "gan"', '"kind": "vae"'))
    with pytest.raises(TamperedArtifactError, match="generator.json .* was modified"):
        load_generator(f"models:/gan-config/{mv.version}", store["uri"])


def test_bad_generators_are_named(store, tmp_path):
    with pytest.raises(ValueError, match="latent dimension mismatch: the config says 3"):
        save_generator(tmp_path / "a", "gan", 3, (2,), random_nets(0))
    with pytest.raises(ValueError, match="unknown generator kind 'diffusion'"):
        save_generator(tmp_path / "b", "diffusion", 2, (2,), random_nets(0))
    with pytest.raises(ValueError, match="needs its encoder"):
        save_generator(tmp_path / "c", "vae", 2, (2,), random_nets(0))
    nets = random_nets(0)
    del nets["discriminator"]
    register(store, "flow-nodisc", nets=nets)
    model = load_generator("models:/flow-nodisc@candidate", store["uri"])
    with pytest.raises(ValueError, match="no discriminator and no density-ratio corrector"):
        model.logit()
    vector = random_nets(1, dict(D_SPEC, out_dim=8))
    register(store, "mmd-critic", nets=vector)
    with pytest.raises(ValueError, match="vector-valued critic"):
        load_generator("models:/mmd-critic@candidate", store["uri"]).logit()


def test_corrector_is_a_new_version_and_adds_to_the_logit(store):
    mv1, nets = register(store, "gan-corr", seed=6)
    corrector = random_nets(7)["discriminator"]
    mv2 = log_generator(store["run_id"], "gan-corr", "gan", 2, (2,),
                        {**nets, "corrector": corrector}, tracking_uri=store["uri"])
    assert int(mv2.version) == int(mv1.version) + 1
    model = load_generator("models:/gan-corr@candidate", store["uri"])
    x = torch.randn(4, 2)
    want = nets["discriminator"][1](x) + corrector[1](x)
    torch.testing.assert_close(model.logit()(x), want)
    torch.testing.assert_close(model.logit(use_corrector=False)(x), nets["discriminator"][1](x))


def test_pyfunc_flavour_draws_base_samples(store):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from fdrl.core.dgflow import paper_settings, refine

    register(store, "gan-pyfunc", seed=8)
    with _use_tracking_uri(store["uri"]):
        pyfunc = mlflow.pyfunc.load_model("models:/gan-pyfunc@candidate")
    x = pyfunc.predict(pd.DataFrame({"n": [70], "seed": [3]}))
    model = load_generator("models:/gan-pyfunc@candidate", store["uri"])
    out = refine(paper_settings("dgflow", steps=1), model.logit(), 70, 3, generator=model.generator,
                 latent_dim=2, data_shape=(2,))
    np.testing.assert_array_equal(x, out.stages[0].numpy())  # the same base samples refinement starts from
