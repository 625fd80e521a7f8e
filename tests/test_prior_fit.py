import torch

from fdrl.data.manifest import open_shard_set
from fdrl.data.stream import shard_batches
from fdrl.workflows.priors import fit_prior_distributed
from fdrl.core.priors import Moments, fit_full, fit_lowrank


def test_ray_tasks_fit_the_same_prior_as_one_pass(ray_cluster, tmp_path):
    from fdrl.data.writer import convert

    convert("mnist", None, tmp_path / "s", shard_size=50, limit=300, progress=False)
    shard_set = open_shard_set(tmp_path / "s")
    whole = Moments.zeros(1024)
    for batch in shard_batches(tmp_path / "s"):
        whole.update(batch)

    full, _ = fit_prior_distributed(shard_set, "full", tasks=3)
    expected = fit_full(whole, (1, 32, 32), clamp=1.0)
    assert full.count == 300
    torch.testing.assert_close(full.mean, expected.mean)
    torch.testing.assert_close(full.scale_tril, expected.scale_tril, atol=1e-5, rtol=0)

    low, _ = fit_prior_distributed(shard_set, "lowrank", rank=8, tasks=2)
    expected_low = fit_lowrank(whole, (1, 32, 32), rank=8, clamp=1.0)
    torch.testing.assert_close(low.scales, expected_low.scales, rtol=1e-4, atol=1e-6)
