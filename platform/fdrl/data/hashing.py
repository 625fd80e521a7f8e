"""sha256 of a file, streamed: shard sidecars, manifests and the registry's tamper tags use it."""

from __future__ import annotations

import hashlib
import os
from functools import partial


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

