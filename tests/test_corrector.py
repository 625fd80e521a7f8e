"""jobs/train_corrector.py on registered 2D generators (real sqlite MLflow): the corrector becomes
a new version of the generator's model, its logit adds to d (or stands alone), and it learns."""


import pytest
import torch
from mlflow.tracking import MlflowClient

from fdrl.tracking.generators import load_generator





@pytest.fixture(scope="module")
def store(tmp_path_factory, register_toy_generators, load_job):
    store = register_toy_generators(tmp_path_factory.mktemp("corrector"), "c")
    return dict(store, job=load_job("train_corrector"))


def losses(uri, name):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fdrl-generators").experiment_id],
                                f"attributes.run_name = 'corrector-{name}'")
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "corrector_loss"),
                                    key=lambda m: m.step)]


def test_calibrating_a_critic_registers_a_new_version_that_learns(store):
    before = load_generator("models:/gan-c@candidate", store["uri"])
    args = ["--generator", "models:/gan-c@candidate", "--iters", "300", "--lr", "0.05", "--log-every", "50",
            "--tracking-uri", store["uri"]]
    assert store["job"].main(args) == 0
    after = load_generator("models:/gan-c@candidate", store["uri"])
    assert after.version == "2" and set(after.nets) == {"generator", "discriminator", "corrector"}
    x = torch.randn(16, 2)
    torch.testing.assert_close(after.logit()(x), before.nets["discriminator"](x) + after.nets["corrector"](x))
    curve = losses(store["uri"], "gan-c-v1")
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.05  # it separates data from the generator


def test_reference_discriminator_and_no_discriminator(store):
    args = ["--generator", "models:/flow-c@candidate", "--reference", "models:/gan-c/1", "--iters", "20",
            "--tracking-uri", store["uri"]]
    assert store["job"].main(args) == 0
    m = load_generator("models:/flow-c@candidate", store["uri"])
    ref = load_generator("models:/gan-c/1", store["uri"])
    x = torch.randn(8, 2)
    torch.testing.assert_close(m.logit()(x), ref.nets["discriminator"](x) + m.nets["corrector"](x))
    with pytest.raises(SystemExit, match="has no discriminator to start from"):
        store["job"].main(["--generator", "models:/gan-c@candidate", "--reference", "models:/flow-c/1",
                    "--iters", "5", "--tracking-uri", store["uri"]])
    # a fresh corrector for a model without any discriminator: the corrector is the whole logit
    assert store["job"].main(["--generator", "models:/flow-c/1", "--iters", "5", "--tracking-uri", store["uri"]]) == 0
    fresh = load_generator("models:/flow-c@candidate", store["uri"])
    torch.testing.assert_close(fresh.logit()(x), fresh.nets["corrector"](x))
