"""Translation training on a real local Ray (2 workers): the source-domain prior is streamed and
resumed with the checkpoint, and the model is registered as fdrl-<source>-to-<target>."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fdrl.config import TrainConfig

pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    from fdrl.data.writer import convert

    root = tmp_path_factory.mktemp("domains")
    convert("sklearn-digits", None, root / "digits", shard_size=32, limit=128, progress=False)
    convert("mnist", None, root / "mnist", shard_size=32, limit=128, progress=False)
    return root


def tiny(domains, workdir, **overrides) -> TrainConfig:
    cfg = dict(data=str(domains / "mnist"), source=str(domains / "digits"), prior="source",
               dataset="digits-to-mnist", arch="mnist32", steps=4, batch=8, workers=2, lr=1e-3,
               decay_steps=[3], flow_steps=2, extra_steps=1, log_every=1, checkpoint_every=2,
               sample_every=2, grid_size=4, max_failures=1, storage=str(workdir / "runs"),
               tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    return TrainConfig(**{**cfg, **overrides})


def _tensors(result) -> dict:
    from safetensors.torch import load_file

    d = Path(result.checkpoint)
    return {**{f"model.{k}": v for k, v in load_file(str(d / "model.safetensors")).items()},
            **{f"ema.{k}": v for k, v in load_file(str(d / "ema.safetensors")).items()}}


def test_translation_trains_resumes_exactly_and_registers(ray_cluster, domains, tmp_path, train):
    straight = train(tiny(domains, tmp_path, run_name="straight"))
    train(tiny(domains, tmp_path, run_name="split", steps=2, register=False))
    resumed = train(tiny(domains, tmp_path, run_name="split", steps=4, resume=True,
                          register=False))
    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # the prior stream resumed exactly
    # Every rank's source-stream position is in the checkpoint.
    state = torch.load(Path(resumed.checkpoint) / "state.pt", weights_only=True)
    positions = [s["prior_position"] for s in state["rank_states"]]
    assert positions == [{"epoch": 0, "index": 16}] * 2  # 4 steps x 4 source images per rank
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias("fdrl-digits-to-mnist", "candidate")
    assert version.tags["fdrl.prior"] == "source"
