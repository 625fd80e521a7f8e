"""Standard FID inside training runs: the demo preset's MLflow run carries an "fid" metric (read
back through MLflow's client), and a run on an unlabelled image folder logs FID at every report
with no classifier anywhere. Sizes are tiny (FID-8): these check the plumbing, not the values."""

import dataclasses
import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fdrl.config import TrainConfig
from fdrl.presets import MNIST

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fidtrain")


def _history(cfg: TrainConfig, run_id: str, key: str) -> list:
    return MlflowClient(cfg.tracking_uri).get_metric_history(run_id, key)


def test_demo_preset_run_logs_fid(ray_cluster, workdir, train):
    from fdrl.data.writer import convert

    shards = workdir / "mnist"
    convert("mnist", None, shards, shard_size=64, limit=128, progress=False)
    assert MNIST.fid  # the demo computes FID unless told not to
    cfg = dataclasses.replace(
        MNIST, data=str(shards), steps=2, batch=8, flow_steps=1, extra_steps=1, log_every=1,
        checkpoint_every=2, sample_every=2, grid_size=4, fid_samples=8, register=False,
        storage=str(workdir / "runs"), tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    result = train(cfg)
    run_id = result.mlflow_run_id
    fid = _history(cfg, run_id, "fid")
    assert [m.step for m in fid] == [2]  # only at the end by default
    assert math.isfinite(fid[0].value) and fid[0].value > 0
    assert _history(cfg, run_id, "fid_seconds")[0].value > 0
    assert result.metrics["fid"] == pytest.approx(fid[0].value)  # what Ray Train (and Tune) saw
    run = MlflowClient(cfg.tracking_uri).get_run(run_id)
    assert run.data.params["fid_samples"] == "8"


def test_unlabelled_folder_run_logs_fid_every_report(ray_cluster, workdir, train):
    from PIL import Image

    from fdrl.data.writer import convert

    folder = workdir / "my_images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for i in range(16):  # coloured discs at random places: no labels anywhere
        cy, cx, r = rng.integers(8, 24, 2).tolist() + [int(rng.integers(4, 8))]
        img = np.zeros((32, 32, 3), np.uint8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(64, 256, 3)
        Image.fromarray(img).save(folder / f"{i}.png")
    shards = workdir / "folder_shards"
    convert("folder", folder, shards, resolution=32, shard_size=8, progress=False)
    cfg = TrainConfig(data=str(shards), dataset="my-images", arch="cifar10", prior="gaussian",
                      hflip=False, steps=2, batch=4, workers=2, flow_steps=1, extra_steps=1,
                      log_every=1, checkpoint_every=2, sample_every=2, grid_size=4,
                      fid=True, fid_every=1, fid_samples=6, register=False,
                      storage=str(workdir / "runs"), tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    result = train(cfg)
    fid = _history(cfg, result.mlflow_run_id, "fid")
    assert sorted(m.step for m in fid) == [1, 2]
    assert all(math.isfinite(m.value) and m.value > 0 for m in fid)
    assert cfg.eval_classifier == "" and "kid" not in result.metrics
