"""jobs/train_gan.py on a real local Ray Train (2 workers, gradients all-reduced) and sqlite MLflow:
the trained WGAN-GP registers as gan-<dataset>@candidate with its critic, and loads back; the
critic separates data from the generator's samples after a short run."""


import pytest
import torch
from mlflow.tracking import MlflowClient

from fdrl.core.gan import critic_loss, gradient_penalty
from fdrl.tracking.generators import load_generator



def test_gradient_penalty_is_zero_for_a_unit_slope_critic():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.6, 0.8]]))  # |grad| = 1 everywhere
    gen = torch.Generator().manual_seed(0)
    critic = lambda x: lin(x)[:, 0]  # noqa: E731
    assert gradient_penalty(critic, torch.randn(8, 2), torch.randn(8, 2), gen).item() < 1e-10
    with torch.no_grad():
        lin.weight.mul_(3.0)  # |grad| = 3: penalty (3 - 1)^2
    assert gradient_penalty(critic, torch.randn(8, 2), torch.randn(8, 2), gen).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unknown GAN loss 'lsgan'"):
        critic_loss("lsgan", critic, torch.zeros(2, 2), torch.zeros(2, 2), gen)


@pytest.mark.timeout(600)
def test_train_gan_registers_generator_and_critic(tmp_path, ray_cluster, load_job):
    job = load_job("train_gan")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert job.main(["--dataset", "25gaussians", "--steps", "60", "--workers", "2", "--width", "32",
                     "--batch", "64", "--lr", "1e-3", "--log-every", "20", "--tracking-uri", uri,
                     "--storage", str(tmp_path / "ray")]) == 0
    model = load_generator("models:/gan-25gaussians@candidate", uri)
    assert model.kind == "gan" and set(model.nets) == {"generator", "discriminator"}
    assert model.info["dataset"] == "25gaussians" and model.info["steps"] == 60
    client = MlflowClient(uri)
    history = client.get_metric_history(model.run_id, "critic_loss")
    assert [m.step for m in history] == [20, 40, 60]
    assert client.get_run(model.run_id).data.params["workers"] == "2"
    # the critic learned something: data scores above generated samples
    from fdrl.data.toy import make_toy

    with torch.no_grad():
        fake = model.generator(torch.randn(2000, 2, generator=torch.Generator().manual_seed(1)))
        real = torch.from_numpy(make_toy("25gaussians", 2000, 5))
        d = model.logit()
        assert d(real).mean() > d(fake).mean()
