import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fdrl.data.stream import ShardStream, epoch_shards

from fdrl.data.manifest import open_shard_set


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8), "L").save(buf, format="PNG")
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
        rows.append({"shard": name, "count": per_shard, "bytes": (root / name).stat().st_size,
                     "sha256": "", "resolution": 8, "source": "test"})
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"resolution": "8", "channels": "1"})
    pq.write_table(table, root / "manifest.parquet")
    return root


def _keys(stream: ShardStream, n: int) -> list[str]:
    it = stream.samples()
    return [next(it)[1] for _ in range(n)]


def test_two_workers_read_disjoint_shards_covering_the_epoch(tmp_path):
    shard_set = open_shard_set(_write_set(tmp_path / "s", n_shards=5, per_shard=4))
    all_keys = {f"{s:03d}_{i:03d}" for s in range(5) for i in range(4)}
    per_rank = []
    for rank in range(2):
        mine = epoch_shards(5, epoch=0, seed=3, rank=rank, world=2)
        per_rank.append(set(_keys(ShardStream(shard_set, rank, 2, seed=3), 4 * len(mine))))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == all_keys
    # Each epoch reshuffles which worker gets which shard.
    orders = {tuple(epoch_shards(5, e, 3, 0, 2)) for e in range(6)}
    assert len(orders) > 1


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


def test_too_few_shards_for_the_workers(tmp_path):
    shard_set = open_shard_set(_write_set(tmp_path / "s", n_shards=1, per_shard=2))
    with pytest.raises(ValueError, match="1 shards cannot feed 2 workers"):
        ShardStream(shard_set, 0, 2, seed=0)
