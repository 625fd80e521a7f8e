"""Placeholder until the storage layer lands (local paths only)."""

from __future__ import annotations


def is_uri(path: str) -> bool:
    return "://" in str(path)


def filesystem(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def resolve(path: str) -> str:
    from pathlib import Path

    return str(path).rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())
