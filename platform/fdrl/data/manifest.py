"""The manifest of a shard set: one parquet row per shard, written last, so its presence means
"complete". ``open_shard_set`` is what training, evaluation and prior fitting read."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path

MANIFEST_NAME = "manifest.parquet"


@dataclass(frozen=True)
class ShardSet:
    root: Path
    shards: tuple[str, ...]  # paths relative to root
    counts: tuple[int, ...]
    resolution: int
    channels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    @property
    def total(self) -> int:
        return sum(self.counts)


def open_shard_set(path: str | os.PathLike) -> ShardSet:
    """A shard directory (or its manifest file), checked to exist and to list shards."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path does not exist: {path}")
    manifest = _manifest_path(path)
    if not manifest.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {path}: prepare the data with datasets/prepare.py first")
    table, meta = read_manifest(manifest)
    if table.num_rows == 0:
        raise ValueError(f"manifest {manifest} lists no shards")
    return ShardSet(manifest.parent.resolve(), tuple(table.column("shard").to_pylist()),
                    tuple(int(c) for c in table.column("count").to_pylist()),
                    int(meta["resolution"]), int(meta["channels"]))


def write_manifest(out_dir: Path, records: list[dict], *, source: str, metadata: dict) -> None:
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
    with atomic_path(out_dir / MANIFEST_NAME) as tmp:
        pq.write_table(table, tmp)


def _manifest_path(dir_or_file: str | os.PathLike) -> Path:
    path = Path(dir_or_file)
    return path / MANIFEST_NAME if path.is_dir() else path


def read_manifest(dir_or_file: str | os.PathLike) -> tuple[pa.Table, dict]:
    """The manifest table (one row per shard) and its metadata with JSON values decoded."""
    path = _manifest_path(dir_or_file)
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}")
    table = pq.read_table(path)
    raw = table.schema.metadata or {}
    metadata = {key.decode(): json.loads(value) for key, value in raw.items()
                if not key.startswith(b"ARROW:")}
    return table, metadata


def manifest_hash(dir_or_file: str | os.PathLike) -> str:
    """sha256 over the shards' sha256s in manifest order: names the exact data (cache key, tag)."""
    table, _ = read_manifest(dir_or_file)
    return hashlib.sha256("\n".join(table.column("sha256").to_pylist()).encode()).hexdigest()


def shard_urls(dir_or_file: str | os.PathLike) -> list[str]:
    """Absolute shard paths in manifest order, ready for ``webdataset.WebDataset``."""
    path = _manifest_path(dir_or_file)
    table, _ = read_manifest(path)
    return [str(path.parent.resolve() / name) for name in table.column("shard").to_pylist()]

