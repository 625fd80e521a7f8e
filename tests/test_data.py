import hashlib
import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fdrl.data import limits
from fdrl.data.stream import ShardReadError, ShardStream, StreamStats, epoch_plan, iter_samples

from fdrl.data.manifest import open_shard_set


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.full((8, 8), value, np.uint8)
    pixels[:, 0] = 255 - value  # not mirror-symmetric, so a flip shows
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_manifest(root: Path, counts: dict | None = None) -> None:
    """A manifest over the tars in ``root`` as they are now (sha256, bytes); a shard's sample
    count from its members' keys, or from ``counts`` (shard index -> count) to disagree."""
    rows, counts = [], counts or {}
    for s, tar_path in enumerate(sorted(root.glob("*.tar"))):
        data = tar_path.read_bytes()
        if s not in counts:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                counts[s] = len({m.name.split(".")[0] for m in tar.getmembers()})
        rows.append({"shard": tar_path.name, "count": counts[s],
                     "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                     "resolution": 8, "source": "test"})
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"resolution": "8", "channels": "1"})
    pq.write_table(table, root / "manifest.parquet")


def _write_set(root: Path, n_shards: int, per_shard: int, extra_members=None) -> Path:
    """A shard set in the converter's format: KEY.png members plus a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        members = [(f"{s:03d}_{i:03d}.png", _png((s * per_shard + i) % 256)) for i in range(per_shard)]
        members += (extra_members or {}).get(s, [])
        (root / f"t-{s:06d}.tar").write_bytes(_tar(members))
    _write_manifest(root)
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


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    bad = {0: [("000_bad.png", b"this is not an image"), ("000_note.txt", b"hello")]}
    root = _write_set(tmp_path / "s", n_shards=2, per_shard=3, extra_members=bad)
    stream = ShardStream(open_shard_set(root), 0, 1, seed=0)
    keys = []
    for _, key in stream.samples():  # to the end of epoch 0: every sample has been seen
        if stream.position["epoch"]:
            break
        keys.append(key)
    assert len(set(keys)) == 6 and not any(k.endswith(("bad", "note")) for k in keys)
    assert stream.stats.skipped == 2
    reasons = stream.stats.reasons
    assert "undecodable image" in reasons["000_bad"] and "no image member" in reasons["000_note"]


# --- shards that cannot be used as the manifest says: the run stops, naming the shard -------------


def _first_batch_error(root) -> tuple[ShardReadError, ShardStream]:
    """The error of a stream's first batch, a whole epoch: every shard is read for it."""
    shard_set = open_shard_set(root)
    stream = ShardStream(shard_set, 0, 1, seed=0)
    with pytest.raises(ShardReadError) as info:
        next(stream.batches(shard_set.total))
    return info.value, stream


def _replace_first_image(tar_path: Path, image: bytes) -> None:
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[0] = (members[0][0], image)
    tar_path.write_bytes(_tar(members))


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "other-size"])
def test_a_changed_shard_is_refused_before_it_feeds_a_batch(tmp_path, same_size):
    root, shard = tmp_path / "s", tmp_path / "s" / "t-000000.tar"
    root.mkdir()
    shard.write_bytes(_tar([(f"000_{i:03d}.png", _png(i + 1)) for i in range(4)]))
    _write_manifest(root)
    before = shard.read_bytes()
    with tarfile.open(shard) as tar:
        first = tar.extractfile(tar.getmembers()[0]).read()
    # A valid image of another grey level and the same length, or a longer one: the tar's
    # size stays the same (it is padded to 10 kB records), or grows.
    other = next(p for p in map(_png, range(256)) if len(p) == len(first) and p != first)
    _replace_first_image(shard, other if same_size else other + b"\0" * 8000)
    assert (len(shard.read_bytes()) == len(before)) == same_size
    err, stream = _first_batch_error(root)
    assert str(shard) in str(err) and "sha256" in str(err) and "does not match the manifest" in str(err)
    assert stream.stats.samples == 0  # refused before any sample of it was decoded


@pytest.mark.parametrize("listed,held", [(4, 5), (4, 3)], ids=["more-samples", "fewer-samples"])
def test_a_sample_count_other_than_the_manifests_is_an_error(tmp_path, listed, held):
    root = _write_set(tmp_path / "s", n_shards=2, per_shard=held)
    _write_manifest(root, counts={1: listed})  # the bytes match; only the count disagrees
    err, _ = _first_batch_error(root)
    assert str(root / "t-000001.tar") in str(err)
    assert f"holds {held} samples, the manifest says {listed}" in str(err)


@pytest.mark.parametrize("cut", [2048 + 512 + 30, 2048 + 300], ids=["in-data", "in-header"])
def test_a_truncated_shard_stops_the_stream(tmp_path, cut):
    # The manifest written after the cut, so its sha256 agrees: the tar itself is what is wrong.
    root = _write_set(tmp_path / "s", n_shards=1, per_shard=3)
    shard = root / "t-000000.tar"
    shard.write_bytes(shard.read_bytes()[:cut])  # inside the 3rd member (512 B header + data)
    _write_manifest(root, counts={0: 3})
    err, _ = _first_batch_error(root)
    assert str(shard) in str(err)
    # Cut inside data: tarfile fails. Cut inside a header: tarfile sees an end, the count tells.
    assert ("not a readable tar" if cut == 2048 + 512 + 30 else "holds 2 samples") in str(err)


def _unreadable(path: Path, how: str) -> None:
    path.unlink()
    if how == "folder":  # EISDIR, even for root
        path.mkdir()
    elif how == "symlink-loop":  # ELOOP, even for root
        os.symlink(path.name, path)
    elif how == "no-permission":
        path.write_bytes(b"")
        path.chmod(0)


@pytest.mark.parametrize("how", ["missing", "folder", "symlink-loop", "no-permission"])
def test_an_unreadable_shard_stops_the_stream_and_the_prior_fit(tmp_path, how):
    from fdrl.data.prior_fit import PriorFit, group_stats

    if how == "no-permission" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode (the other cases run as root too)")
    root = _write_set(tmp_path / "s", n_shards=3, per_shard=2)
    shard_set = open_shard_set(root)
    _unreadable(root / "t-000001.tar", how)
    err, _ = _first_batch_error(root)
    assert str(root / "t-000001.tar") in str(err)
    with pytest.raises(ShardReadError, match="t-000001.tar"):  # not a prior of the other shards
        group_stats(PriorFit(shard_set, "full", 0, 0), list(shard_set.shards))
    with pytest.raises(ShardReadError, match="t-000001.tar"):
        list(iter_samples(shard_set, StreamStats()))


def test_shard_read_errors_survive_pickling():  # how Ray hands a worker's error to the driver
    err = pickle.loads(pickle.dumps(ShardReadError("s3://b/x/t.tar", "no such file", 2)))
    assert isinstance(err, ShardReadError) and isinstance(err, OSError) and err.errno == 2
    assert str(err) == "cannot read shard s3://b/x/t.tar: no such file"
    assert (err.url, err.reason) == ("s3://b/x/t.tar", "no such file")


def test_a_manifest_without_sha256_is_refused(tmp_path):
    root = _write_set(tmp_path / "s", n_shards=2, per_shard=2)
    table = pq.read_table(root / "manifest.parquet")
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256",
                             pa.array(["", table.column("sha256")[1].as_py()]))
    pq.write_table(table, root / "manifest.parquet")
    with pytest.raises(ValueError, match="no sha256 for shard t-000000.tar"):
        open_shard_set(root)


# --- bounded decoding inside a shard ------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (IHDR and IEND only): a few dozen bytes whose
    decoding would need width * height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side,pil", [(9000, "warns"), (9000, "warning-filter"), (100_000, "refuses")])
def test_a_decompression_bomb_in_a_shard_is_skipped_with_the_reason(tmp_path, side, pil):
    # 9000^2 = 81 Mpx: over the bound, where PIL itself only warns (up to twice its limit).
    # fdrl.data.limits makes that warning an error, and also checks the size itself, for a
    # process whose warning filters were reset (pytest resets them around each test).
    import warnings

    bomb = {0: [("000_bomb.png", _png_header(side, side))]}
    root = _write_set(tmp_path / "s", n_shards=1, per_shard=3, extra_members=bomb)
    stream = ShardStream(open_shard_set(root), 0, 1, seed=0)
    with warnings.catch_warnings():
        if pil == "warning-filter":  # as in a process that imported fdrl.data.limits
            warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        else:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        keys = _keys(stream, 3)
    assert "000_bomb" not in keys and stream.stats.skipped == 1
    reason = stream.stats.reasons["000_bomb"]
    assert reason.startswith("000_bomb: decompression bomb") and "MAX_IMAGE_PIXELS" in reason
    # Which check refused it: PIL's (its error, or its warning made one), or limits' own.
    assert ("exceeds limit" if pil != "warns" else f"declares {side} x {side}") in reason
    assert side * side > limits.MAX_IMAGE_PIXELS


def test_a_tar_member_over_the_bound_is_refused_unread(tmp_path, monkeypatch):
    large = _png(9) + b"\0" * 4000  # decodes (PIL ignores the tail), but is 4 kB
    root = _write_set(tmp_path / "s", n_shards=1, per_shard=3,
                      extra_members={0: [("000_large.png", large)]})
    ok = ShardStream(open_shard_set(root), 0, 1, seed=0)
    assert "000_large" in _keys(ok, 4)  # under the real bound it is an ordinary sample
    monkeypatch.setattr(limits, "MAX_MEMBER_BYTES", 1000)
    stream = ShardStream(open_shard_set(root), 0, 1, seed=0)
    assert "000_large" not in _keys(stream, 3)
    assert stream.stats.skipped == 1
    assert f"declares {len(large)} bytes" in stream.stats.reasons["000_large"]
    assert "MAX_MEMBER_BYTES" in stream.stats.reasons["000_large"]


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
