"""jobs/evaluate.py on an unlabelled image folder: standard FID per stage (prior, K, K + kappa,
real vs real) with no classifier anywhere, logged to MLflow and usable for promotion. Sizes are
tiny (FID-8): this checks the plumbing, not the values."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from fdrl.config import TrainConfig
from fdrl.data.writer import convert

pytestmark = pytest.mark.integration  # starts Ray, a server or a job process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unlabelled_model(tmp_path_factory, register_random_model):
    tmp = tmp_path_factory.mktemp("fideval")
    uri = f"sqlite:///{tmp}/mlflow.db"
    rng = np.random.default_rng(0)
    (tmp / "photos").mkdir()
    for i in range(16):
        img = np.zeros((32, 32, 3), np.uint8)
        img[rng.integers(0, 16):, rng.integers(0, 16):] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(tmp / "photos" / f"{i}.png")
    convert("folder", tmp / "photos", tmp / "shards", resolution=32, shard_size=8, progress=False)
    cfg = TrainConfig(data=str(tmp / "shards"), dataset="photos", arch="cifar10", prior="gaussian",
                      flow_steps=1, extra_steps=1, eta=0.5)
    register_random_model(tmp, uri, "photos", cfg)
    return tmp, uri


@pytest.mark.timeout(1200)  # the module fixture (a registration) is timed with the test
def test_evaluate_unlabelled_reports_standard_fid_per_stage(unlabelled_model):
    tmp, uri = unlabelled_model
    out = tmp / "eval"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/evaluate.py"), "--model", "models:/photos@candidate",
         "--n", "8", "--workers", "1", "--out", str(out), "--tracking-uri", uri,
         "--promote-if-better", "fid"],
        capture_output=True, text=True, cwd=tmp, env={**__import__("os").environ, "FDRL_HOME": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "standard FID" in proc.stdout and "FID-8 against 8 real images" in proc.stdout
    result = json.loads((out / "metrics.json").read_text())
    assert result["labelled"] is False
    stages = result["stages"]
    assert set(stages) == {"prior", "K", "K+kappa", "real (baseline)"}
    assert all("fd" not in m and m["fid"] > 0 for m in stages.values())  # no domain metrics
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("photos", "champion")  # promoted on FID
    run = client.get_run(version.tags["eval_run_id"])
    assert run.data.metrics["K_plus_kappa.fid"] == pytest.approx(stages["K+kappa"]["fid"])
    assert float(version.tags["eval_fid"]) == pytest.approx(stages["K+kappa"]["fid"], rel=1e-5)
    # The reference statistics were stored in MLflow for the next machine.
    assert client.get_experiment_by_name("fdrl-fid-reference") is not None
