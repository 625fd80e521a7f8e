"""Distributed sampling from the registry on a real local Ray, and the whole path end to end:
train -> register -> a fresh process loads by alias -> jobs/sample.py twice gives the same samples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fdrl.config import TrainConfig
from fdrl.tracking.registry import load_fdrl_model
from fdrl.core.flow import FlowSettings
from fdrl.core.chunks import chunks
from fdrl.core.sampler import sample
from fdrl.workflows.sample import sample_distributed, sample_to_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, register_random_model):
    """A random mnist32 network with a fitted full prior, registered as fdrl-sampling@candidate."""
    root = tmp_path_factory.mktemp("sampling")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = TrainConfig(dataset="unit", arch="mnist32", prior="full", flow_steps=2, extra_steps=1)
    x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    register_random_model(root, uri, "fdrl-sampling", cfg, prior_images=x)
    return load_fdrl_model("models:/fdrl-sampling@candidate", uri), uri


def test_chunks_cover_n_with_a_short_last_chunk():
    assert chunks(40, 16) == [(0, 0, 16), (1, 16, 16), (2, 32, 8)]
    with pytest.raises(ValueError, match="n >= 1"):
        chunks(0, 16)


def test_same_seed_same_samples_for_any_worker_count(ray_cluster, registered):
    model, _ = registered
    a = sample_distributed(model, 40, seed=3, workers=2, chunk=16, progress=False)
    b = sample_distributed(model, 40, seed=3, workers=2, chunk=16, progress=False)
    one = sample_distributed(model, 40, seed=3, workers=1, chunk=16, progress=False)
    other = sample_distributed(model, 40, seed=4, workers=2, chunk=16, progress=False)
    assert a.shape == (40, 1, 32, 32) and a.dtype == np.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, one)  # chunk seeds do not depend on the worker count
    assert not np.array_equal(a, other)
    # The in-process sampler draws the same chunks; bit-equal at one torch thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = sample(model.net, model.pairing, FlowSettings.from_config(model.config), 40, 3,
                       prior=model.prior, chunk=16).x.clamp(-1, 1).numpy()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(a, local)


def test_sample_to_dir_writes_samples_and_grid(ray_cluster, registered, tmp_path):
    _, uri = registered
    summary = sample_to_dir("models:/fdrl-sampling@candidate", 10, tmp_path / "out", seed=1,
                            workers=2, chunk=4, tracking_uri=uri, progress=False, extra_steps=2)
    samples = np.load(tmp_path / "out" / "samples.npy")
    assert samples.shape == (10, 1, 32, 32) and samples.dtype == np.float32
    assert -1 <= samples.min() and samples.max() <= 1
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0
    assert summary["flow"] == {"flow_steps": 2, "extra_steps": 2, "eta": 3.0, "nu": 0.01,
                               "precision": "fp32", "bound": 0.0}
    assert summary["images_per_s"] == pytest.approx(summary["n"] / summary["seconds"])


@pytest.mark.timeout(600)
def test_train_register_load_in_fresh_process_and_sample_twice(ray_cluster, tmp_path):
    from fdrl.workflows.train import check_run, resolve, run_training
    from fdrl.data.writer import convert

    shards = tmp_path / "shards"
    convert("mnist", None, shards, shard_size=64, limit=128, progress=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrainConfig(data=str(shards), dataset="mnist", arch="mnist32", prior="full", steps=2,
                      batch=8, workers=2, lr=1e-3, decay_steps=[3], flow_steps=2, extra_steps=1,
                      log_every=1, checkpoint_every=2, sample_every=2, grid_size=4,
                      max_failures=0, storage=str(tmp_path / "runs"), tracking_uri=uri)
    result = run_training(check_run(resolve(cfg)))
    assert result.model_uri == "models:/fdrl-mnist@candidate"

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    code = ("import hashlib, json, sys; from fdrl.tracking.registry import load_fdrl_model; "
            "m = load_fdrl_model(sys.argv[1], sys.argv[2]); "
            "print(json.dumps({k: hashlib.sha256(v.numpy().tobytes()).hexdigest() "
            "for k, v in m.net.state_dict().items()}))")
    out = subprocess.run([sys.executable, "-c", code, result.model_uri, uri], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    trained = load_file(str(Path(result.checkpoint) / "ema.safetensors"))
    import hashlib
    assert loaded == {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in trained.items()}

    arrays = []
    for attempt in range(2):
        out_dir = tmp_path / f"samples-{attempt}"
        job = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "sample.py"), "--model", result.model_uri,
             "--n", "24", "--out", str(out_dir), "--seed", "5", "--workers", "2", "--chunk", "8",
             "--tracking-uri", uri], env=env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stderr[-3000:]
        assert "24 samples from models:/fdrl-mnist/1" in job.stdout
        arrays.append(np.load(out_dir / "samples.npy"))
        assert (out_dir / "grid.png").exists()
    assert arrays[0].shape == (24, 1, 32, 32)
    np.testing.assert_array_equal(arrays[0], arrays[1])
