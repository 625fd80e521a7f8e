"""jobs/evaluate.py and jobs/refine.py end to end on a tiny registered model (real sqlite MLflow)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from fdrl.config import TrainConfig
from fdrl.data.stream import shard_batches

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(600), pytest.mark.integration]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, register_random_model, labelled_mnist):
    tmp = tmp_path_factory.mktemp("evalrefine")
    uri = f"sqlite:///{tmp}/mlflow.db"
    shards, clf = labelled_mnist["shards"], labelled_mnist["classifier"]

    cfg = TrainConfig(data=str(shards), dataset="mnist", arch="mnist32", prior="full",
                      flow_steps=3, extra_steps=2, eta=1.0, nu=0.01)
    register_random_model(tmp, uri, "tiny", cfg, prior_images=torch.cat(list(shard_batches(shards))))
    return tmp, uri, clf


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_evaluate_logs_stage_metrics_curve_and_promotes(setup):
    tmp, uri, clf = setup
    out = tmp / "eval"
    stdout = _run("evaluate.py", "--model", "models:/tiny@candidate", "--classifier", clf, "--n", 100,
                  "--out", out, "--tracking-uri", uri, "--promote-if-better", "fd",
                  "--no-fid")  # standard FID: tests/test_fid_evaluate.py
    assert "real vs real" in stdout and "promoted to champion" in stdout
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["stages"]) == {"prior", "K", "K+kappa", "real (baseline)"}
    assert len(result["kl_curve"]) == 3 + 2 + 1
    # Two halves of the real data are far closer than untrained-flow samples are to data.
    fd = {k: v["fd"] for k, v in result["stages"].items()}
    assert fd["real (baseline)"] < fd["K+kappa"]
    for name in ("kl_curve.png", "neighbours_pixel.png", "neighbours_feature.png", "interpolation.png"):
        assert (out / name).stat().st_size > 0
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("tiny", "champion")
    run = client.get_run(version.tags["eval_run_id"])
    assert run.data.tags["model_version"] == str(version.version)
    assert len(client.get_metric_history(run.info.run_id, "kl_diagnostic")) == 6
    logged = run.data.metrics
    for stage in ("prior", "K", "K_plus_kappa", "real_baseline"):
        assert {f"{stage}.fd", f"{stage}.kid_mean", f"{stage}.precision"} <= set(logged), stage
    assert logged["real_baseline.fd"] == pytest.approx(fd["real (baseline)"])


def test_refine_writes_refined_samples_grid_and_kl_per_step(setup):
    tmp, uri, _ = setup
    start = np.clip(np.random.default_rng(0).normal(0, 0.5, (16, 1, 32, 32)), -1, 1).astype(np.float32)
    np.save(tmp / "start.npy", start)
    out = tmp / "refined"
    stdout = _run("refine.py", "--model", "models:/tiny@candidate", "--input", tmp / "start.npy",
                  "--steps", 4, "--gamma", 0.01, "--out", out, "--tracking-uri", uri)
    refined = np.load(out / "refined.npy")
    assert refined.shape == start.shape and not np.array_equal(refined, start)
    assert len(json.loads((out / "kl.json").read_text())["mean_log_r"]) == 5
    assert stdout.count("mean log r") == 5 and (out / "before_after.png").stat().st_size > 0
    # A registered generator works as input too.
    _run("refine.py", "--model", "models:/tiny@candidate", "--input", "models:/tiny@candidate",
         "--n", 8, "--steps", 2, "--out", tmp / "refined2", "--tracking-uri", uri)
    assert np.load(tmp / "refined2" / "refined.npy").shape == (8, 1, 32, 32)


def test_refine_names_a_missing_input(setup):
    tmp, uri, _ = setup
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/refine.py"), "--model", "models:/tiny@candidate",
                           "--input", str(tmp / "nope.npy"), "--out", str(tmp / "x"), "--tracking-uri", uri],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "input samples not found" in proc.stderr and "nope.npy" in proc.stderr


class _Frozen(torch.nn.Module):
    """A ratio network with zero input gradient: the flow leaves its starting points alone."""

    def forward(self, x):
        return x.flatten(1).sum(1) * 0.0


class _Fixed:
    """A prior that hands out given images (or NaNs), so the samples are known exactly."""

    def __init__(self, images):
        self.images = images

    def sample(self, n, generator=None, device="cpu"):
        return self.images[:n].to(device)


def test_domain_kid_ranks_real_images_above_noise(setup, labelled_mnist):
    from fdrl.core.divergences import get_pairing
    from fdrl.core.flow import FlowSettings
    from fdrl.data.manifest import open_shard_set
    from fdrl.eval.evaluation import DomainKID
    from fdrl.data.stream import shard_batches

    _, _, clf = setup
    shards = labelled_mnist["shards"]
    from fdrl.eval.classifier import load_classifier

    kid = DomainKID(load_classifier(clf), open_shard_set(shards), n=64, seed=0, device="cpu")
    images = torch.cat(list(shard_batches(shards)))
    # The evaluator's real set is the seed-0 stream's first 64 images; compare other real ones.
    held_out = images[-64:]
    still = FlowSettings(flow_steps=1, extra_steps=0, eta=1.0, nu=0.0)
    args = (_Frozen(), None, get_pairing("lr-kl"), still)
    real = kid(args[0], _Fixed(held_out), *args[2:])
    noise = kid(args[0], _Fixed(torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1),
                *args[2:])
    blurred = kid(args[0], _Fixed(torch.nn.functional.avg_pool2d(held_out, 5, 1, 2)), *args[2:])
    assert abs(real) < 0.1 * min(blurred, noise)  # real digits sit far closer than degraded ones
    assert kid(args[0], _Fixed(held_out), *args[2:]) == real  # fixed seed: the same figure
    assert kid(args[0], _Fixed(torch.full((64, 1, 32, 32), float("nan"))), *args[2:]) == float("inf")
