"""The source-domain prior of translation: a second shard stream, disjoint per rank, exact resume;
the sklearn-digits converter; shape checks between the domains."""

import pytest
import torch

from fdrl.config import TrainConfig
from fdrl.data.manifest import open_shard_set
from fdrl.data.source_prior import SourcePrior
from fdrl.data.writer import convert
from fdrl.distributed.train_worker import open_prior


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    convert("sklearn-digits", None, root / "d32", shard_size=20, limit=120, progress=False)
    convert("sklearn-digits", None, root / "d16", resolution=16, shard_size=20, limit=40,
            progress=False)
    return root


def test_sklearn_digits_converter_upsamples_to_32_and_keeps_labels(digits):
    from sklearn.datasets import load_digits

    from fdrl.eval.classifier import load_labeled

    shard_set = open_shard_set(digits / "d32")
    assert shard_set.shape == (1, 32, 32) and len(shard_set.shards) == 6
    images, labels, keys = load_labeled(digits / "d32")
    assert images.shape == (120, 1, 32, 32) and images.min() == -1 and images.max() > 0.9
    ref = load_digits()
    index = int(keys[0].rsplit("_", 1)[1])  # the key keeps sklearn's index
    assert labels[0] == ref.target[index]
    # Up-sampled, not padded: the 8x8 digit fills the frame; averaging 4x4 blocks gives it back.
    down = images[0, 0].reshape(8, 4, 8, 4).mean((1, 3))
    expected = torch.tensor(ref.images[index] / 16.0 * 2 - 1, dtype=torch.float32)
    assert torch.corrcoef(torch.stack([down.flatten(), expected.flatten()]))[0, 1] > 0.95


def _keys(prior, n, batch=8):
    out = []
    for _ in range(n // batch):
        prior.sample(batch)
        out += prior.last_keys
    return out


def test_source_prior_is_disjoint_per_rank_and_covers_each_epoch(digits):
    ranks = [SourcePrior.open(digits / "d32", rank, 2, seed=5) for rank in range(2)]
    first = [_keys(p, 56) for p in ranks]  # 3 shards x 20 = 60 per rank and epoch
    assert not set(first[0]) & set(first[1])
    assert len(set(first[0])) == 56 and len(set(first[1])) == 56
    batch = ranks[0].sample(8)
    assert batch.shape == (8, 1, 32, 32) and batch.dtype == torch.float32
    # The source stream is not the data stream of the same seed: its order is its own.
    from fdrl.data.stream import ShardStream

    data = ShardStream(open_shard_set(digits / "d32"), 0, 2, seed=5).samples()
    assert [next(data)[1] for _ in range(56)] != first[0]


def test_source_prior_resumes_exactly(digits):
    prior = SourcePrior.open(digits / "d32", 1, 2, seed=3)
    _keys(prior, 48)  # into the second shard
    saved = prior.position
    expected_keys = _keys(prior, 64)  # crosses into the next epoch
    expected = prior.sample(8)
    resumed = SourcePrior.open(digits / "d32", 1, 2, seed=3, position=saved)
    assert _keys(resumed, 64) == expected_keys
    assert torch.equal(resumed.sample(8), expected)
    assert resumed.position["epoch"] == 1


def test_translation_config_and_domain_shapes_are_checked(digits):
    cfg = TrainConfig(prior="source", source=str(digits / "d32"), data=str(digits / "d16"))
    with pytest.raises(ValueError, match=r"source images have shape \(1, 32, 32\) but the target's "
                                         r"have shape \(1, 16, 16\)"):
        open_prior(cfg, open_shard_set(digits / "d16").shape)
    assert open_prior(cfg, (1, 32, 32)).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="translation takes both --prior source and --source DIR"):
        TrainConfig(prior="source").validate()
    with pytest.raises(ValueError, match="translation takes both"):
        TrainConfig(prior="full", source="x").validate()


def test_launcher_refuses_domains_of_different_shapes(digits, tmp_path):
    from fdrl.workflows.train import check_run, resolve

    cfg = TrainConfig(prior="source", source=str(digits / "d16"), data=str(digits / "d32"),
                      arch="mnist32", storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    run = resolve(cfg)
    assert run.config.source == str((digits / "d16").resolve()) and not run.prior_to_fit
    with pytest.raises(ValueError, match=r"source images have shape \(1, 16, 16\) but the target's "
                                         r"have shape \(1, 32, 32\)"):
        check_run(run)
