"""jobs/sample.py's composed runs on a real local Ray and sqlite MLflow: class-conditional rows
(eq. 31) and translation of given images; reproducible by seed, equal to the in-process sampler,
and clear errors for bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fdrl.config import TrainConfig
from fdrl.core.flow import FlowSettings
from fdrl.core.guidance import class_potential
from fdrl.core.sampler import sample
from fdrl.eval.classifier import ClassifierConfig, MnistClassifier, TrainResult
from fdrl.tracking.classifiers import register_classifier
from fdrl.workflows.sample import conditional_to_dir, translate_to_dir
from fdrl.tracking.registry import load_fdrl_model

REPO = Path(__file__).resolve().parents[1]
MODEL, CLF, CLF28 = "models:/fdrl-unit@candidate", "models:/classifier-unit@candidate", "models:/classifier-unit28@candidate"


def _register_classifier(uri, name, in_shape, seed):
    torch.manual_seed(seed)
    model = MnistClassifier(ClassifierConfig(in_shape=in_shape, channels=(4, 8), feature_dim=16)).eval()
    result = TrainResult(model, 0.0, 0.0, 0.0, 0, 0)
    register_classifier(result, name, tracking_uri=uri)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, register_random_model):
    """A random mnist32 ratio (uniform prior, K + kappa = 3) and two random classifiers."""
    root = tmp_path_factory.mktemp("composed")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = TrainConfig(dataset="unit", arch="mnist32", prior="uniform", pairing="lr-kl",
                      flow_steps=2, extra_steps=1)
    register_random_model(root, uri, "fdrl-unit", cfg)
    _register_classifier(uri, "classifier-unit", (1, 32, 32), 1)
    _register_classifier(uri, "classifier-unit28", (1, 28, 28), 2)
    return uri


def _in_process(model, n, seed, chunk, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors' setting: bit-equal results
    try:
        return sample(model.net, model.pairing, FlowSettings.from_config(model.config), n, seed,
                      prior=model.prior, chunk=chunk, **kw).x.clamp(-1, 1).numpy()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(300)
def test_conditional_rows_reproducible_logged_and_equal_to_the_sampler(ray_cluster, registry, tmp_path):
    from mlflow.tracking import MlflowClient

    from fdrl.tracking.classifiers import load_registered_classifier

    uri = registry
    run = lambda seed, out, label="all": conditional_to_dir(
        MODEL, CLF, label, 5, tmp_path / out, phi=5.0, seed=seed, workers=2, chunk=4,
        tracking_uri=uri, progress=False)
    summary = run(3, "a")
    rows = np.load(tmp_path / "a" / "samples.npy")
    assert rows.shape == (10, 5, 1, 32, 32)
    assert np.load(tmp_path / "a" / "labels.npy").tolist() == [c for c in range(10) for _ in range(5)]
    np.testing.assert_array_equal(rows, np.load(run(3, "b")["samples"]))
    assert not np.array_equal(rows, np.load(run(4, "c")["samples"]))
    # Row 7 is the in-process sampler with the eq. 31 potential for class 7.
    model = load_fdrl_model(MODEL, uri)
    clf = load_registered_classifier(CLF, uri).requires_grad_(False)
    np.testing.assert_array_equal(rows[7], _in_process(model, 5, 3, 4,
                                                       extra_potential=class_potential(clf, 7, 5.0, model.pairing)))
    unguided = _in_process(model, 5, 3, 4)
    assert not np.array_equal(rows[7], unguided) and not np.array_equal(rows[7], rows[2])
    one = np.load(run(3, "d", "7")["samples"])
    assert one.shape == (5, 1, 32, 32)
    np.testing.assert_array_equal(one, rows[7])
    # The run and its per-class grid are in MLflow.
    client = MlflowClient(uri)
    logged = client.get_run(summary["mlflow_run_id"])
    assert logged.data.params["classifier"] == CLF and logged.data.params["labels"] == "all"
    assert [a.path for a in client.list_artifacts(logged.info.run_id)] == ["grid.png"]


@pytest.mark.timeout(300)
def test_translation_keeps_input_order_and_is_reproducible(ray_cluster, registry, tmp_path):
    uri = registry
    source = np.random.default_rng(0).uniform(-1, 1, (9, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "source.npy", source)
    run = lambda seed, out, workers=2: translate_to_dir(
        MODEL, tmp_path / "source.npy", tmp_path / out, seed=seed, workers=workers, chunk=4,
        tracking_uri=uri, progress=False, log=False)
    run(0, "a")
    translated = np.load(tmp_path / "a" / "samples.npy")
    assert translated.shape == source.shape
    np.testing.assert_array_equal(translated, np.load(run(0, "b", workers=1)["samples"]))
    assert not np.array_equal(translated, np.load(run(1, "c")["samples"]))
    model = load_fdrl_model(MODEL, uri)
    np.testing.assert_array_equal(translated, _in_process(model, 9, 0, 4, start=torch.from_numpy(source)))
    # Input order: the starting points of chunk i are the input rows of chunk i.
    assert np.abs(translated - source).max() > 0  # the images moved
    moved = np.abs(translated - source).reshape(9, -1).mean(1)
    nearest = [int(np.argmin(((source - t) ** 2).reshape(9, -1).sum(1))) for t in translated]
    assert nearest == list(range(9)), moved  # 3 small flow steps: each stays nearest its own source


def test_bad_inputs_are_refused_by_name(registry, tmp_path):
    uri = registry
    with pytest.raises(ValueError, match=r"label\(s\) \[12\] outside the classifier's classes 0..9"):
        conditional_to_dir(MODEL, CLF, "12", 2, tmp_path / "x", tracking_uri=uri, log=False)
    with pytest.raises(ValueError, match=r"does not take the model's images of shape \(1, 32, 32\)"):
        conditional_to_dir(MODEL, CLF28, "1", 2, tmp_path / "x", tracking_uri=uri, log=False)
    np.save(tmp_path / "small.npy", np.zeros((3, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"source images have shape \(1, 28, 28\) but the model's "
                                         r"target images have shape \(1, 32, 32\)"):
        translate_to_dir(MODEL, tmp_path / "small.npy", tmp_path / "x", tracking_uri=uri, log=False)


def test_sample_job_exits_with_the_error(registry, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "sample.py"), "--model", MODEL,
                           "--classifier", CLF, "--label", "10", "--n", "2", "--out", str(tmp_path),
                           "--tracking-uri", registry], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1
    assert "error: label(s) [10] outside the classifier's classes 0..9" in done.stderr
