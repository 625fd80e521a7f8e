"""jobs/train_gan.py on a real local Ray Train (2 workers, gradients all-reduced) and sqlite MLflow:
the trained WGAN-GP registers as gan-<dataset>@candidate with its critic, and loads back; the
critic separates data from the generator's samples after a short run."""


import json

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


def test_a_name_mlflow_would_refuse_at_the_end_is_refused_before_training(load_job, capsys):
    """MLflow refuses '.' in a logged model's name only when the trained model is logged."""
    from fdrl.config import TrainConfig
    from fdrl.distributed.gan_worker import GenConfig

    with pytest.raises(ValueError, match=r"--register-name 'gan-gp0.1': a model name cannot contain \."):
        GenConfig(register_name="gan-gp0.1").validate()
    with pytest.raises(ValueError, match=r"cannot contain / :"):
        TrainConfig(register_name="a/b:c").validate()
    with pytest.raises(SystemExit, match="a model name cannot contain"):
        load_job("train_gan").main(["--dataset", "25gaussians", "--register-name", "x.y"])
    GenConfig(register_name="gan-25gaussians-gp01").validate()


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


@pytest.mark.timeout(600)
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, ray_cluster, hooks):
    """A run that crashes at step 6 (checkpoints every 2 steps), whose latest checkpoint is then
    torn, continued by a new job with resume, ends at exactly the weights of the same run left
    uninterrupted: the torn checkpoint fails its sha256 check and the one before it is used, and a
    checkpoint holds the optimisers' and every rank's RNG states, not just the nets."""
    from fdrl.distributed.gan_worker import GenConfig
    from fdrl.distributed.trainer import RunFailed
    from fdrl.workflows.generators import RUN_INFO, train_generator

    def cfg(name, **kw):
        return GenConfig(dataset="25gaussians", steps=6, workers=2, batch=32, width=16, lr=1e-3,
                         gp_weight=0.1, checkpoint_every=2, log_every=1, register_name=f"gan-{name}",
                         tracking_uri=f"sqlite:///{tmp_path}/{name}.db", storage=str(tmp_path / name),
                         run_name="run", **kw)

    whole = train_generator(cfg("whole"))
    with pytest.raises(RunFailed, match="simulated crash"):
        train_generator(cfg("cut"), train_loop=hooks.gan_raises_at(6, RuntimeError("simulated crash")))
    with pytest.raises(FileExistsError, match="pass resume"):  # a plain rerun would silently resume
        train_generator(cfg("cut"))
    latest = sorted((tmp_path / "cut" / "run").glob("checkpoint_[0-9]*"))[-1]
    assert torch.load(latest / "state.pt", weights_only=True)["step"] == 4
    weights = latest / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # torn by a crash
    resumed = train_generator(cfg("cut", resume=True))
    run_info = json.loads((tmp_path / "cut" / "run" / RUN_INFO).read_text())
    assert resumed["run_id"] == run_info["mlflow_run_id"]  # the same MLflow run, continued

    def final(name, out):
        model = load_generator(out["model_uri"], f"sqlite:///{tmp_path}/{name}.db")
        return {role: net.state_dict() for role, net in model.nets.items()}

    a, b = final("whole", whole), final("cut", resumed)
    for role in a:
        for k in a[role]:
            assert torch.equal(a[role][k], b[role][k]), (role, k)
    # the resumed job restarted after the step-2 checkpoint: steps 3 to 5 ran (and logged) twice
    client = MlflowClient(f"sqlite:///{tmp_path}/cut.db")
    steps = [m.step for m in client.get_metric_history(resumed["run_id"], "critic_loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    assert [steps.count(k) for k in (2, 3, 4, 5, 6)] == [1, 2, 2, 2, 1]


def _write_gan_checkpoint(folder, nets, manifest: bool):
    """The production writer; without ``manifest``, a checkpoint as an earlier release wrote it."""
    from fdrl.data.checkpoint import MANIFEST
    from fdrl.distributed.gan_worker import save_checkpoint

    folder.mkdir()
    save_checkpoint(str(folder), nets, {"step": 7, "rank_states": []})
    if not manifest:
        (folder / MANIFEST).unlink()


@pytest.mark.parametrize("manifest", [True, False])
def test_a_torn_gan_checkpoint_is_refused_and_an_intact_one_loads(tmp_path, manifest):
    """With a manifest a torn file fails its sha256 check; a checkpoint of an earlier release
    (no manifest) counts only if every file loads."""
    from fdrl.data.checkpoint import CorruptCheckpointError
    from fdrl.distributed.gan_worker import load_checkpoint

    torch.manual_seed(0)
    nets = {"generator": torch.nn.Linear(2, 2), "discriminator": torch.nn.Linear(2, 1)}
    _write_gan_checkpoint(tmp_path / "good", nets, manifest)
    fresh = {"generator": torch.nn.Linear(2, 2), "discriminator": torch.nn.Linear(2, 1)}
    assert load_checkpoint(str(tmp_path / "good"), fresh)["step"] == 7
    assert torch.equal(fresh["generator"].weight, nets["generator"].weight)

    _write_gan_checkpoint(tmp_path / "torn", nets, manifest)
    weights = tmp_path / "torn" / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="generator.safetensors has sha256" if manifest
                       else "no manifest"):
        load_checkpoint(str(tmp_path / "torn"), fresh)
