"""DGflow on an image generator: jobs/refine.py scores the unrefined and the refined samples with
domain FD/KID against real labelled shards, writes them to metrics.json and logs them to the
refinement run. A random SN-DCGAN makes noise, so both must sit far above real-vs-real."""

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from fdrl.core.generator_nets import build_net
from fdrl.data.writer import convert
from fdrl.tracking.generators import log_generator
from fdrl.tracking.tracker import Tracker

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def store(tmp_path_factory, load_job, labelled_mnist):
    tmp = tmp_path_factory.mktemp("refine-images")
    uri = f"sqlite:///{tmp}/mlflow.db"
    shards, clf = labelled_mnist["shards"], labelled_mnist["classifier"]
    g_spec, d_spec = {"arch": "dcgan_g", "latent_dim": 16}, {"arch": "dcgan_d"}
    torch.manual_seed(0)
    nets = {"generator": (g_spec, build_net(g_spec)), "discriminator": (d_spec, build_net(d_spec))}
    run_id = Tracker("gan-train", run_name="gan", tracking_uri=uri).run_id
    log_generator(run_id, "gan-img", "gan", 16, (1, 32, 32), nets, {"dataset": "mnist"}, tracking_uri=uri)
    return dict(root=tmp, uri=uri, shards=shards, clf=clf, job=load_job("refine"))


def test_image_refinement_logs_domain_metrics_before_and_after(store):
    out = store["root"] / "out"
    assert store["job"].main(["--generator", "models:/gan-img@candidate", "--n", "64", "--steps", "3",
                              "--seed", "1", "--out", str(out), "--data", str(store["shards"]),
                              "--classifier", str(store["clf"]), "--tracking-uri", store["uri"]]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    before, after = summary["before"], summary["after"]
    assert np.load(out / "samples.npy").shape == (64, 1, 32, 32)
    for m in (before, after):
        assert np.isfinite(m["fd"]) and np.isfinite(m["kid_mean"])
        # untrained generator: noise, far from the digits, while two real halves are close
        assert m["fd"] > 5 * before["real_fd"]
    assert before["fd"] != after["fd"]  # the refined samples were scored, not the base twice
    run = MlflowClient(store["uri"]).search_runs(
        [MlflowClient(store["uri"]).get_experiment_by_name("fdrl-refine").experiment_id])[0]
    assert run.data.metrics["before_fd"] == pytest.approx(before["fd"])
    assert run.data.metrics["after_fd"] == pytest.approx(after["fd"])
    assert run.data.tags["model_name"] == "gan-img"


def test_image_data_of_another_shape_is_named(store, tmp_path, capsys):
    digits = tmp_path / "digits"
    convert("sklearn-digits", None, digits, resolution=16, shard_size=64, limit=64, progress=False)
    with pytest.raises(SystemExit) as info:
        store["job"].main(["--generator", "models:/gan-img@candidate", "--n", "16", "--steps", "1",
                           "--out", str(tmp_path / "o"), "--data", str(digits), "--tracking-uri", store["uri"]])
    assert "holds (1, 16, 16) images, the generator makes (1, 32, 32)" in str(info.value.code)
