"""The prefetching batch iterator: same batches as inline, exact resume position while the thread
reads ahead, errors surfaced in the consumer, data-wait time counted."""

import pytest
import torch

from fdrl.data.manifest import open_shard_set
from fdrl.data.prefetch import BatchPrefetcher
from fdrl.data.stream import ShardStream


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    from fdrl.data.writer import convert

    out = tmp_path_factory.mktemp("mnist") / "shards"
    convert("mnist", None, out, shard_size=64, limit=256, progress=False)
    return open_shard_set(out)


def _stream(shard_set, position=None, rank=0):
    return ShardStream(shard_set, rank, 2, seed=3, hflip=True, position=position)


def _take(batches, n):
    return [next(batches) for _ in range(n)]


@pytest.mark.timeout(120)
def test_prefetched_batches_equal_inline_batches(shard_set):
    # 128 samples per rank per epoch: batches of 24 cross shard and epoch boundaries.
    inline = _take(BatchPrefetcher(_stream(shard_set), 24, depth=0), 7)
    with BatchPrefetcher(_stream(shard_set), 24, depth=3) as ahead:
        prefetched = _take(ahead, 7)
    assert all(torch.equal(a, b) for a, b in zip(inline, prefetched))
    assert len({tuple(b.shape) for b in prefetched}) == 1


@pytest.mark.timeout(120)
def test_position_is_the_consumers_and_resumes_exactly(shard_set):
    with BatchPrefetcher(_stream(shard_set), 24, depth=4) as ahead:
        _take(ahead, 3)
        position = dict(ahead.position)
        following = _take(ahead, 3)
        thread_position = dict(ahead.stream.position)
    inline = BatchPrefetcher(_stream(shard_set), 24, depth=0)
    _take(inline, 3)
    assert position == inline.position == inline.stream.position  # where 72 samples end
    assert thread_position != position  # the thread had read ahead of the consumer
    resumed = _take(BatchPrefetcher(_stream(shard_set, position), 24, depth=2), 3)
    assert all(torch.equal(a, b) for a, b in zip(following, resumed))


class _BrokenStream:
    position = {"epoch": 0, "shard": 0, "offset": 0}

    def batches(self, n):
        yield torch.zeros(n, 1)
        raise OSError("disk went away")


@pytest.mark.parametrize("depth", [0, 2])
def test_read_errors_reach_the_training_loop(depth):
    batches = BatchPrefetcher(_BrokenStream(), 4, depth=depth)
    assert next(batches).shape == (4, 1)
    with pytest.raises((OSError, RuntimeError)) as info:
        next(batches)
    err = info.value
    assert "disk went away" in str(err) + str(err.__cause__)
    batches.close()


def test_wait_time_is_counted_and_the_thread_stops(shard_set):
    inline = BatchPrefetcher(_stream(shard_set), 8, depth=0)
    next(inline)
    assert inline.wait_s > 0 and inline.taken == 1  # decoding happened inside next()
    ahead = BatchPrefetcher(_stream(shard_set), 8, depth=2)
    waits = []
    for _ in range(3):
        next(ahead)
        waits.append(ahead.wait_s)
    assert waits == sorted(waits) and ahead.taken == 3
    ahead.close()
    assert not ahead._thread.is_alive()


def test_negative_depth_is_refused(shard_set):
    with pytest.raises(ValueError, match="prefetch depth must be >= 0 batches, got -1"):
        BatchPrefetcher(_stream(shard_set), 8, depth=-1)


@pytest.mark.parametrize("depth", [0, 2])
def test_an_unreadable_shard_reaches_the_training_loop_by_name(tmp_path, depth):
    from fdrl.data.stream import ShardReadError
    from fdrl.data.writer import convert

    convert("mnist", None, tmp_path / "s", shard_size=32, limit=64, progress=False)
    shard_set = open_shard_set(tmp_path / "s")
    gone = shard_set.url(shard_set.shards[1])
    (tmp_path / "s" / shard_set.shards[1]).unlink()
    with BatchPrefetcher(ShardStream(shard_set, 0, 1, seed=0), 64, depth=depth) as batches:
        with pytest.raises(ShardReadError, match=f"cannot read shard {gone}: "):
            next(batches)  # the same error, with or without the thread
