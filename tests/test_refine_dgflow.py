"""jobs/refine.py --generator end to end: a registered 2D GAN in a real sqlite MLflow, refined in
this process and on 1 or 2 Ray workers (the same arrays), the refinement run read back through
MLflow, --steps auto, and bad input named."""

import json
import re

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fdrl.core.generator_nets import build_net

G_SPEC = {"arch": "mlp", "in_dim": 2, "out_dim": 2, "width": 32, "depth": 2}




@pytest.fixture(scope="module")
def store(tmp_path_factory, register_toy_generators, load_job):
    store = register_toy_generators(tmp_path_factory.mktemp("refine-dgflow"), "toy")
    return dict(store, job=load_job("refine"))


def refine(store, out, *extra):
    args = ["--generator", "models:/gan-toy@candidate", "--n", "150", "--seed", "3", "--out", str(out),
            "--tracking-uri", store["uri"], *map(str, extra)]
    return store["job"].main(args)


@pytest.mark.timeout(600)
def test_writes_base_and_refined_and_logs_a_linked_run(store, ray_cluster):
    out = store["root"] / "r0"
    assert refine(store, out, "--space", "data", "--steps", 20) == 0
    base, refined = np.load(out / "base.npy"), np.load(out / "samples.npy")
    assert base.shape == refined.shape == (150, 2) and not np.array_equal(base, refined)
    assert (out / "before_after.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and set(metrics["before"]) == {"kde_score", "pct_high_quality", "modes_covered"}

    client = MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("fdrl-refine")
    (run,) = client.search_runs([exp.experiment_id], "tags.model_name = 'gan-toy'")
    assert run.data.tags["model_version"] == "1" and run.data.tags["model_run_id"] == store["run_id"]
    assert run.data.params["method"] == "dgflow" and run.data.params["space"] == "data"
    history = client.get_metric_history(run.info.run_id, "mean_log_ratio")
    assert [m.step for m in history] == list(range(21))
    assert run.data.metrics["after_kde_score"] == pytest.approx(metrics["after"]["kde_score"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"base.npy", "samples.npy", "before_after.png", "curve.json"} <= names

    # Ray workers: the same arrays for 1 and 2 workers (each a single torch thread per task)
    for workers in (1, 2):
        o = store["root"] / f"r-w{workers}"
        assert refine(store, o, "--space", "data", "--steps", 20, "--workers", workers) == 0
    np.testing.assert_array_equal(np.load(store["root"] / "r-w1" / "samples.npy"),
                                  np.load(store["root"] / "r-w2" / "samples.npy"))
    np.testing.assert_array_equal(np.load(store["root"] / "r-w1" / "base.npy"), base)
    np.testing.assert_allclose(np.load(store["root"] / "r-w1" / "samples.npy"), refined, atol=1e-5)


def test_same_seed_same_arrays_and_latent_space(store):
    a, b = store["root"] / "lat-a", store["root"] / "lat-b"
    for out in (a, b):
        assert refine(store, out, "--space", "latent", "--steps", 5, "--f", "js") == 0
    assert np.array_equal(np.load(a / "samples.npy"), np.load(b / "samples.npy"))
    data = store["root"] / "lat-data"
    assert refine(store, data, "--space", "data", "--steps", 1) == 0
    assert np.array_equal(np.load(a / "base.npy"), np.load(data / "base.npy"))  # same latents


def test_steps_auto_picks_a_count_from_a_pilot(store):
    out = store["root"] / "auto"
    assert refine(store, out, "--space", "data", "--steps", "auto", "--max-steps", 60, "--tol", 1e-3) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert len(curve["pilot"]) == 61 and 1 <= curve["steps"] <= 60
    assert len(curve["mean_log_ratio"]) == curve["steps"] + 1


def test_baselines_run(store):
    for method in ("dot", "ddls"):
        out = store["root"] / method
        assert refine(store, out, "--method", method, "--steps", 5) == 0
        assert np.load(out / "samples.npy").shape == (150, 2)


@pytest.mark.parametrize("extra, message", [
    (["--f", "hellinger"], "unknown f 'hellinger'"),
    (["--method", "mh"], "invalid choice: 'mh'"),
    (["--gamma", "-0.5"], "gamma .* must be >= 0"),
    (["--space", "pixels"], "unknown space 'pixels'"),
    (["--steps", "many"], "--steps must be an integer or 'auto'"),
    (["--generator", "models:/flow-toy@candidate"], "no discriminator and no density-ratio corrector"),
    (["--space", "data", "--input", "WRONG"], r"--input samples have shape \(3,\)"),
])
def test_bad_input_is_named(store, capsys, extra, message):
    if "WRONG" in extra:
        np.save(store["root"] / "wrong.npy", np.zeros((10, 3), np.float32))
        extra = [str(store["root"] / "wrong.npy") if e == "WRONG" else e for e in extra]
    with pytest.raises(SystemExit) as info:
        refine(store, store["root"] / "bad", *extra)
    text = f"{info.value.code} {capsys.readouterr().err}"
    assert re.search(message, text), text
    assert not (store["root"] / "bad" / "samples.npy").exists()


def test_latent_dimension_mismatch_is_named(store, tmp_path):
    from fdrl.tracking.generators import save_generator

    g = build_net(dict(G_SPEC, in_dim=3))
    with pytest.raises(ValueError, match="latent dimension mismatch: the config says 2, the "
                                         r"generator takes \(3,\)"):
        save_generator(tmp_path, "gan", 2, (2,), {"generator": (dict(G_SPEC, in_dim=3), g)})
