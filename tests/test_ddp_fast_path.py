"""The fast path (bf16 autocast, channels_last weights) through DDP over gloo, without Ray: two
processes on a file store run the core training step on different data and must end with the
same parameters (gradients all-reduced), all fp32 and still channels_last."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdrl.core.acceleration import to_channels_last
from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.networks import build_network
from fdrl.core.priors import make_simple_prior
from fdrl.core.step import make_state, train_step


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = to_channels_last(build_network("mnist32"))
        model = torch.nn.parallel.DistributedDataParallel(module)
        state = make_state(model, lr=1e-3, module=module)
        gen = torch.Generator().manual_seed(rank)
        data = torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1  # different data on each rank
        for _ in range(2):
            train_step(state, data, make_simple_prior("uniform", (1, 32, 32), clamp=1.0),
                       get_pairing("lsif-chi2"), FlowSettings(2, 0, 3.0, 0.01, "bf16"), gen)
        torch.save({k: v.clone() for k, v in module.state_dict().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_bf16_channels_last_ddp_keeps_ranks_in_sync(tmp_path):
    out = str(tmp_path / "weights")
    mp.start_processes(_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    a, b = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    initial = build_network("mnist32").state_dict()
    assert a.keys() == b.keys() == initial.keys()
    for k in a:
        assert a[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)  # all-reduced: identical
    assert not all(torch.equal(a[k], initial[k]) for k in a)  # and trained
    assert a["features.0.weight"].is_contiguous(memory_format=torch.channels_last)
