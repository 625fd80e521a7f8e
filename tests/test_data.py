import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fdrl.data.stream import ShardStream, epoch_plan

from fdrl.data.manifest import open_shard_set


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.full((8, 8), value, np.uint8)
    pixels[:, 0] = 255 - value  # not mirror-symmetric, so a flip shows
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def _write_set(root: Path, n_shards: int, per_shard: int, extra_members=None) -> Path:
    """A shard set in the converter's format: KEY.png members plus a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_shards):
        name = f"t-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            members = [(f"{s:03d}_{i:03d}.png", _png((s * per_shard + i) % 256)) for i in range(per_shard)]
            members += (extra_members or {}).get(s, [])
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        rows.append({"shard": name, "count": len(members), "bytes": (root / name).stat().st_size,
                     "sha256": "", "resolution": 8, "source": "test"})
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"resolution": "8", "channels": "1"})
    pq.write_table(table, root / "manifest.parquet")
    return root


def _keys(stream: ShardStream, n: int) -> list[str]:
    it = stream.samples()
    return [next(it)[1] for _ in range(n)]


def _epoch_keys(shard_set, rank: int, world: int, seed: int, epoch: int = 0) -> list[str]:
    stream = ShardStream(shard_set, rank, world, seed=seed, position={"epoch": epoch, "index": 0})
    keys = []
    for _, key in stream.samples():
        if stream.position["epoch"] != epoch:
            break
        keys.append(key)
    return keys


@pytest.mark.parametrize("n_shards,world", [(5, 2), (1, 2), (2, 3), (1, 4)])
def test_workers_read_disjoint_samples_covering_the_epoch(tmp_path, n_shards, world):
    shard_set = open_shard_set(_write_set(tmp_path / "s", n_shards=n_shards, per_shard=4))
    all_keys = {f"{s:03d}_{i:03d}" for s in range(n_shards) for i in range(4)}
    for epoch in (0, 1):
        per_rank = [_epoch_keys(shard_set, rank, world, seed=3, epoch=epoch) for rank in range(world)]
        assert sum(len(k) for k in per_rank) == len(all_keys)  # none twice
        assert set().union(*map(set, per_rank)) == all_keys
        sizes = sorted(len(k) for k in per_rank)
        assert sizes[-1] - sizes[0] <= 1  # an even split, to one sample


def test_each_epoch_reorders_the_shards():
    orders = {tuple(index for index, _, _ in epoch_plan([4] * 5, e, 3, 0, 1)) for e in range(6)}
    assert len(orders) > 1


def test_a_worker_opens_only_the_shards_its_slice_touches():
    plan = epoch_plan([10] * 8, epoch=0, seed=0, rank=1, world=4)
    assert sum(stop - first for _, first, stop in plan) == 20 and len(plan) == 2


def test_resumed_stream_continues_exactly(tmp_path):
    shard_set = open_shard_set(_write_set(tmp_path / "s", n_shards=3, per_shard=5))
    full = _keys(ShardStream(shard_set, 0, 1, seed=1), 40)  # crosses two epoch boundaries
    first = ShardStream(shard_set, 0, 1, seed=1)
    head = _keys(first, 17)
    resumed = ShardStream(shard_set, 0, 1, seed=1, position=first.position)
    assert head + _keys(resumed, 23) == full


@pytest.mark.parametrize("cut", [2048 + 512 + 30, 2048 + 300], ids=["in-data", "in-header"])
def test_corrupt_members_are_skipped_and_counted(tmp_path, cut):
    bad = {0: [("000_bad.png", b"this is not an image"), ("000_note.txt", b"hello")]}
    root = _write_set(tmp_path / "s", n_shards=2, per_shard=3, extra_members=bad)
    # Truncate the second shard inside its third member (512-byte header + 512-byte data each).
    last = root / "t-000001.tar"
    last.write_bytes(last.read_bytes()[:cut])
    stream = ShardStream(open_shard_set(root), 0, 1, seed=0)
    keys = _keys(stream, 5)  # one epoch: 3 intact samples + 2 before the truncation
    assert all(not k.endswith(("bad", "note")) for k in keys) and len(set(keys)) == 5
    assert stream.stats.skipped == 3  # undecodable png, a sample with no image, the truncated tar
    reasons = " ".join(stream.stats.reasons.values())
    assert "undecodable image" in reasons and "no image member" in reasons and "unreadable tar" in reasons


def test_missing_path_and_missing_manifest_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path does not exist: .*nowhere"):
        open_shard_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.parquet in .*empty"):
        open_shard_set(tmp_path / "empty")


def test_one_shard_resumes_exactly_with_two_workers(tmp_path):
    shard_set = open_shard_set(_write_set(tmp_path / "s", n_shards=1, per_shard=7))
    full = _keys(ShardStream(shard_set, 1, 2, seed=2), 12)  # 4 samples per epoch: three epochs
    first = ShardStream(shard_set, 1, 2, seed=2)
    head = _keys(first, 5)
    resumed = ShardStream(shard_set, 1, 2, seed=2, position=first.position)
    assert head + _keys(resumed, 7) == full


def test_more_workers_than_samples_is_refused(tmp_path):
    shard_set = open_shard_set(_write_set(tmp_path / "s", n_shards=1, per_shard=2))
    with pytest.raises(ValueError, match="2 samples in .* cannot feed 3 workers"):
        ShardStream(shard_set, 0, 3, seed=0)
    with pytest.raises(ValueError, match="older stream format"):
        ShardStream(shard_set, 0, 1, seed=0, position={"epoch": 0, "shard": 0, "offset": 1})


def test_hflip_mirrors_some_samples_the_same_way_every_time(tmp_path):
    root = tmp_path / "s"
    _write_set(root, n_shards=2, per_shard=16)
    shard_set = open_shard_set(root)
    plain = {k: img for img, k in _take(ShardStream(shard_set, 0, 1, seed=4), 32)}
    flipped = _take(ShardStream(shard_set, 0, 1, seed=4, hflip=True), 32)
    again = _take(ShardStream(shard_set, 0, 1, seed=4, hflip=True), 32)
    assert [k for _, k in flipped] == [k for _, k in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(flipped, again))
    mirrored = [not torch.equal(img, plain[k]) for img, k in flipped]
    for (img, k), m in zip(flipped, mirrored):
        assert torch.equal(img, plain[k].flip(-1) if m else plain[k])
    assert 4 <= sum(mirrored) <= 28  # about half, by a per-(seed, epoch, key) coin


def _take(stream: ShardStream, n: int) -> list:
    it = stream.samples()
    return [next(it) for _ in range(n)]
