"""Standard FID on Ray (fdrl.workflows.standard_fid): distributed features equal one local pass
whatever the worker count; the reference statistics come back from the local cache and from MLflow."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.networks import build_network
from fdrl.core.priors import make_simple_prior
from fdrl.core.sampler import sample
from fdrl.data.manifest import open_shard_set
from fdrl.data.stream import shard_batches
from fdrl.distributed.fanout import ActorPool
from fdrl.eval.fid import FeatureStats, FeatureWorker, ITEM_IMAGES, feature_stats, shard_items
from fdrl.eval.inception import InceptionFeatures
from fdrl.workflows.standard_fid import ensure_reference, sample_stats, shard_stats


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from PIL import Image

    from fdrl.data.writer import convert

    root = tmp_path_factory.mktemp("fidshards")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(5):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
    convert("folder", root / "images", root / "shards", resolution=16, shard_size=2, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def local(shards):
    torch.set_num_threads(1)
    extractor = InceptionFeatures()
    return extractor, feature_stats(extractor, shard_batches(shards, 64, limit=4))


def _same(a: FeatureStats, b: FeatureStats):
    assert a.count == b.count
    assert torch.allclose(a.kept, b.kept, atol=1e-4)
    assert torch.allclose(a.moments.outer, b.moments.outer, rtol=1e-5, atol=1e-3)


@pytest.mark.timeout(900)
def test_distributed_features_equal_local_for_any_worker_count(ray_cluster, shards, local):
    _, expected = local
    with ActorPool(1, FeatureWorker) as pool:
        one = shard_stats(pool, open_shard_set(shards), limit=4, progress=False)
    with ActorPool(2, FeatureWorker) as pool:
        two = shard_stats(pool, open_shard_set(shards), limit=4, progress=False)
    _same(one, expected)
    _same(two, expected)


@pytest.mark.timeout(900)
def test_reference_cached_locally_and_in_mlflow(ray_cluster, shards, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path, source = ensure_reference(shards, limit=3, workers=2, cache_dir=tmp_path / "a",
                                    tracking_uri=uri, progress=False)
    assert source == "computed" and FeatureStats.load(path).count == 3
    again, source = ensure_reference(shards, limit=3, cache_dir=tmp_path / "a", tracking_uri=uri)
    assert source == "local" and again == path
    fetched, source = ensure_reference(shards, limit=3, cache_dir=tmp_path / "b", tracking_uri=uri)
    assert source == "mlflow" and Path(fetched).parent == tmp_path / "b"
    assert torch.equal(FeatureStats.load(fetched).moments.outer, FeatureStats.load(path).moments.outer)


@pytest.mark.timeout(900)
def test_sample_features_follow_the_core_sampler(ray_cluster, local):
    extractor, _ = local
    torch.manual_seed(0)
    net = build_network("mnist32").eval()
    prior = make_simple_prior("gaussian", (1, 32, 32), clamp=1.0)
    flow = FlowSettings(flow_steps=1, extra_steps=1, eta=0.5, nu=0.01)
    with ActorPool(2, FeatureWorker, None, (net, prior, get_pairing("lsif-chi2"), flow)) as pool:
        got = sample_stats(pool, 3, seed=5, progress=False)
    x = sample(net, get_pairing("lsif-chi2"), flow, 3, 5, prior=prior).x.clamp(-1, 1)
    _same(got, FeatureStats.empty().update(extractor(x)))


def test_shard_items_cover_the_range_in_pieces(tmp_path):
    from fdrl.data.writer import convert

    convert("mnist", None, tmp_path / "m", shard_size=300, limit=700, progress=False)
    shard_set = open_shard_set(tmp_path / "m")
    items, sizes = shard_items(shard_set, limit=500, start=100)
    assert sum(sizes) == 500 and all(s <= ITEM_IMAGES for s in sizes)
    # (shard, skip, take) pieces tile images 100 .. 600 of the manifest order exactly once
    counts = {"mnist-000000.tar": 0, "mnist-000001.tar": 300, "mnist-000002.tar": 600}
    covered = [counts[name] + skip + i for _, name, skip, take in items for i in range(take)]
    assert covered == list(range(100, 600))
    with pytest.raises(ValueError, match="none from index 700"):
        shard_items(shard_set, limit=5, start=700)
