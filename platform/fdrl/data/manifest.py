"""The manifest of a shard set: one parquet row per shard, written last, so its presence means
"complete". ``open_shard_set`` is what training, evaluation and prior fitting read.

A shard set lives in a local folder or under an object-store prefix (``s3://bucket/data``); the
manifest and the shards are reached through ``fdrl.data.storage`` only."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

MANIFEST_NAME = "manifest.parquet"


@dataclass(frozen=True)
class ShardSet:
    root: str  # the folder: an absolute local path or a normalised URI (storage.resolve)
    shards: tuple[str, ...]  # paths relative to root
    counts: tuple[int, ...]
    resolution: int
    channels: int
    sha256: tuple[str, ...]  # per shard, as the manifest says: checked when the shard is read
    sizes: tuple[int, ...]  # per shard, bytes

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def url(self, shard: str) -> str:
        """Where shard ``shard`` (a name from ``shards``) is."""
        return storage.join(self.root, shard)


def open_shard_set(path: str | os.PathLike) -> ShardSet:
    """A shard folder (or its manifest file), checked to exist and to list shards. A missing
    folder or manifest is a FileNotFoundError naming it; a missing bucket, wrong credentials or an
    unreachable endpoint a StorageError naming the manifest's URI."""
    path = storage.resolve(path)
    manifest = _manifest_path(path)
    try:
        table, meta = read_manifest(manifest)
    except FileNotFoundError as err:
        if storage.is_uri(path) and not storage.exists(_bucket_root(path)):
            raise  # the error already says that the bucket is missing
        if manifest != path and storage.is_dir(path):
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {path}: prepare the data with "
                                    "datasets/prepare.py first") from err
        raise FileNotFoundError(f"data path does not exist: {path}") from err
    if table.num_rows == 0:
        raise ValueError(f"manifest {manifest} lists no shards")
    shards = tuple(table.column("shard").to_pylist())
    sha256 = tuple(table.column("sha256").to_pylist())
    unverifiable = [s for s, digest in zip(shards, sha256) if not digest]
    if unverifiable:  # every manifest the writer makes has them: this one was made by hand
        raise ValueError(f"manifest {manifest} has no sha256 for shard {unverifiable[0]}, so its "
                         "bytes cannot be checked: prepare the data with datasets/prepare.py")
    return ShardSet(storage.parent(manifest), shards,
                    tuple(int(c) for c in table.column("count").to_pylist()),
                    int(meta["resolution"]), int(meta["channels"]), sha256,
                    tuple(int(b) for b in table.column("bytes").to_pylist()))


def write_manifest(out_dir: str | os.PathLike, records: list[dict], *, source: str,
                   metadata: dict) -> None:
    """Write ``out_dir/manifest.parquet`` complete or not at all (``storage.write_bytes``)."""
    n = len(records)
    table = pa.table({
        "shard": pa.array([r["shard"] for r in records], pa.string()),
        "count": pa.array([r["count"] for r in records], pa.int64()),
        "bytes": pa.array([r["bytes"] for r in records], pa.int64()),
        "sha256": pa.array([r["sha256"] for r in records], pa.string()),
        "resolution": pa.array([metadata["resolution"]] * n, pa.int32()),
        "source": pa.array([source] * n, pa.string()),
    })
    table = table.replace_schema_metadata(
        {key.encode(): json.dumps(value).encode() for key, value in metadata.items()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(out_dir, MANIFEST_NAME), sink.getvalue())


def _bucket_root(uri: str) -> str:
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _manifest_path(dir_or_file: str | os.PathLike) -> str:
    """The manifest of a folder, or the path itself when it names a parquet file. Decided by the
    name, not by asking the storage (one request fewer on an object store)."""
    path = storage.resolve(dir_or_file)
    return path if storage.name(path).endswith(".parquet") else storage.join(path, MANIFEST_NAME)


def read_manifest(dir_or_file: str | os.PathLike) -> tuple[pa.Table, dict]:
    """The manifest table (one row per shard) and its metadata with JSON values decoded."""
    path = _manifest_path(dir_or_file)
    data = storage.read_bytes(path)  # StorageNotFoundError (a FileNotFoundError) names the path
    try:
        # One thread, and not read_table's dataset scanner: once pyarrow.fs is loaded (storage),
        # a process that has started Arrow's thread pool aborts at exit now and then ("terminate
        # called without an active exception", apache/arrow#34314): 8 of 40 runs of
        # datasets/prepare.py did with read_table, 0 of 60 with this. A manifest is a few kB.
        with pq.ParquetFile(pa.BufferReader(data)) as parquet:
            table = parquet.read(use_threads=False)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"manifest {path} is not a readable parquet file: {err}") from err
    raw = table.schema.metadata or {}
    metadata = {key.decode(): json.loads(value) for key, value in raw.items()
                if not key.startswith(b"ARROW:")}
    return table, metadata


def manifest_hash(dir_or_file: str | os.PathLike) -> str:
    """sha256 over the shards' sha256s in manifest order: names the exact data (cache key, tag)."""
    table, _ = read_manifest(dir_or_file)
    return hashlib.sha256("\n".join(table.column("sha256").to_pylist()).encode()).hexdigest()


def shard_urls(dir_or_file: str | os.PathLike) -> list[str]:
    """Shard paths (absolute, or URIs) in manifest order."""
    path = _manifest_path(dir_or_file)
    table, _ = read_manifest(path)
    return [storage.join(storage.parent(path), name) for name in table.column("shard").to_pylist()]
