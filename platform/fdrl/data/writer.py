"""Dataset preparation: raw datasets -> webdataset tar shards at the training resolution + a manifest.

Pipeline: a *reader* yields ``(key, payload, label)`` items in a deterministic (sorted) order; each
item is decoded and preprocessed with PIL, encoded as a lossless PNG and written into shards.

Shard set layout (one folder per set, local or under an object-store prefix ``s3://bucket/x``)::

    NAME-000000.tar       samples i*shard_size .. (i+1)*shard_size-1 of the input order
    NAME-000000.tar.json  sidecar: count, size, sha256, skipped inputs, conversion parameters
    ...
    manifest.parquet      one row per shard; written last, so its presence means "complete"

Sample format (webdataset conventions): members ``KEY.png`` (the processed image, mode RGB or L)
and ``KEY.cls`` (decimal label as ASCII text, only when the source has labels). ``KEY`` is
``{input index:08d}_{slug of the source key}``: unique, deterministic and free of dots (webdataset
splits a member name at the first dot).

Each shard is written to a local temporary file, then published (renamed into place locally,
uploaded with ``storage.put_file`` to an object store), then its sidecar; the manifest goes last.
So an interrupted conversion never leaves a valid-looking shard set, and a partial upload is never
a shard.

Resume: input item i always lands in shard i // shard_size, so a rerun skips every shard whose
sidecar matches (same parameters, same input keys, same tar size) without decoding its images.
Undecodable inputs (decompression bombs and archive members over ``limits`` included) are skipped
and recorded (key + error), never fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from . import storage
from .atomic import atomic_path
from .hashing import sha256_file
from .manifest import MANIFEST_NAME, manifest_hash, write_manifest
from .readers import (CAT2DOG_DOMAINS, IMAGE_EXTENSIONS, MNIST_SOURCE, PREPROCESSORS, Item, Payload,
                      existing, process, read_celeba, read_cifar10, read_folder, read_lsun,
                      read_mnist, read_sklearn_digits)

FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 1000
AUTO_SHARDS = 8  # a set smaller than AUTO_SHARDS full shards is cut into this many shards
MODES = {1: "L", 3: "RGB"}  # --channels


@dataclass(frozen=True)
class ManifestInfo:
    """What a conversion produced (also recoverable later with ``read_manifest``)."""

    out_dir: str  # absolute local path or URI
    dataset: str
    total_count: int
    shard_count: int
    reused_shards: int
    skipped: list[dict]
    resolution: int
    channels: int
    manifest_hash: str
    seconds: float

    @property
    def manifest(self) -> str:
        return storage.join(self.out_dir, MANIFEST_NAME)

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)


def _sample_key(index: int, source_key: str) -> str:
    stem, ext = os.path.splitext(source_key)
    if ext.lower() not in IMAGE_EXTENSIONS:
        stem = source_key
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:64]
    return f"{index:08d}_{slug}" if slug else f"{index:08d}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime, owner) so the same samples always give the same bytes and sha256.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _keys_digest(chunk: list[Item]) -> str:
    return hashlib.sha256("\n".join(key for key, _, _ in chunk).encode()).hexdigest()


def _reusable_record(tar_url: str, params: dict, keys_digest: str) -> dict | None:
    """The sidecar of a complete shard made from these inputs with these parameters, else None.
    A missing shard or sidecar means "write it"; any other storage error stops the conversion."""
    try:
        record = json.loads(storage.read_text(tar_url + ".json"))
        size = storage.size(tar_url)
    except (FileNotFoundError, ValueError):
        return None
    if record.get("params") != params or record.get("keys_sha256") != keys_digest:
        return None
    return record if record.get("bytes") == size else None


@contextmanager
def _staged(url: str):
    """A local file to write ``url``'s content into, published at ``url`` only if the block
    succeeds: renamed into place in a local folder, uploaded (complete or not at all) to an
    object store."""
    if not storage.is_uri(url):
        with atomic_path(Path(url)) as tmp:
            yield tmp
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{storage.name(url)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        storage.put_file(tmp, url)
    finally:
        os.unlink(tmp)


def _write_shard(
    tar_url: str, chunk: list[Item], first_index: int, encode: Callable[[Payload], bytes],
    params: dict, keys_digest: str, on_item: Callable[[], Any],
) -> dict:
    """Write one shard and then its sidecar, the sidecar being the shard's commit record.

    The old sidecar goes first, so a crash at any point leaves no sidecar vouching for a tar it
    does not describe. Size and sha256 are taken from the local file, before it is published.
    """
    sidecar = tar_url + ".json"
    storage.remove(sidecar, missing_ok=True)
    count, skipped = 0, []
    with _staged(tar_url) as tmp:
        with tarfile.open(tmp, "w") as tar:
            for offset, (key, payload, label) in enumerate(chunk):
                try:
                    png = encode(payload)
                except Exception as exc:  # any decoder failure on untrusted input means "skip it"
                    skipped.append({"key": key, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                finally:
                    on_item()
                sample_key = _sample_key(first_index + offset, key)
                _add_member(tar, f"{sample_key}.png", png)
                if label is not None:
                    _add_member(tar, f"{sample_key}.cls", str(label).encode())
                count += 1
        record = {
            "shard": storage.name(tar_url), "count": count, "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp), "skipped": skipped,
            "params": params, "keys_sha256": keys_digest,
        }
    storage.write_text(sidecar, json.dumps(record, indent=1))
    return record


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _remove_stale_shards(out_dir: str, dataset: str, shard_count: int) -> None:
    """Drop shards of an earlier, longer run (e.g. without ``limit``) so globs see only this set."""
    pattern = re.compile(rf"{re.escape(dataset)}-(\d{{6}})\.tar(\.json)?")
    for name in storage.listdir(out_dir):
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) >= shard_count:
            storage.remove(storage.join(out_dir, name), missing_ok=True)


def auto_shard_size(n_items: int) -> int:
    """Full shards of DEFAULT_SHARD_SIZE for large sets; a small set is cut into AUTO_SHARDS
    shards, so prior fits and data loading still spread over several workers."""
    return max(1, min(DEFAULT_SHARD_SIZE, -(-n_items // AUTO_SHARDS)))


def write_shards(
    items: Iterable[Item], out_dir: str | os.PathLike, *, dataset: str, source: str,
    preprocess: str, resolution: int, mode: str, shard_size: int | None = None,
    limit: int | None = None, progress: bool = True,
) -> ManifestInfo:
    """Write ``items`` as shards ``{dataset}-NNNNNN.tar`` plus ``manifest.parquet`` in ``out_dir``
    (a local folder or an object-store URI).

    Shards already complete there are kept; the manifest is removed first and written last.
    ``shard_size`` None: ``auto_shard_size`` of the number of items.
    """
    if preprocess not in PREPROCESSORS:
        raise ValueError(f"unknown preprocess {preprocess!r}; valid: {sorted(PREPROCESSORS)}")
    items, total = islice(items, limit), limit
    if shard_size is None:
        peek = DEFAULT_SHARD_SIZE * AUTO_SHARDS
        head = list(islice(items, peek))
        shard_size = auto_shard_size(len(head))
        items, total = chain(head, items), len(head) if len(head) < peek else limit
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    start = time.perf_counter()
    out_dir = storage.resolve(out_dir)
    storage.check_writable(out_dir)  # a missing bucket or wrong credentials: now, not after shard 1
    storage.remove(storage.join(out_dir, MANIFEST_NAME), missing_ok=True)
    params = {"format_version": FORMAT_VERSION, "dataset": dataset, "preprocess": preprocess,
              "resolution": resolution, "mode": mode}
    encode = partial(process, preprocess=preprocess, resolution=resolution, mode=mode)
    records, reused = [], 0
    with tqdm(total=total, desc=dataset, unit="img", disable=not progress) as bar:
        for index, chunk in enumerate(_chunks(items, shard_size)):
            tar_url = storage.join(out_dir, f"{dataset}-{index:06d}.tar")
            digest = _keys_digest(chunk)
            record = _reusable_record(tar_url, params, digest)
            if record is None:
                record = _write_shard(tar_url, chunk, index * shard_size, encode, params, digest,
                                      partial(bar.update, 1))
            else:
                reused += 1
                bar.update(len(chunk))
            records.append(record)
    if not records:
        raise ValueError(f"no input images found in {source}")
    _remove_stale_shards(out_dir, dataset, len(records))
    skipped = [entry for record in records for entry in record["skipped"]]
    total = sum(record["count"] for record in records)
    channels = len(Image.new(mode, (1, 1)).getbands())
    write_manifest(out_dir, records, source=source, metadata={
        "format_version": FORMAT_VERSION, "dataset": dataset, "resolution": resolution,
        "channels": channels, "mode": mode, "preprocess": preprocess, "shard_size": shard_size,
        "total_count": total, "skipped_count": len(skipped), "skipped": skipped,
    })
    return ManifestInfo(
        out_dir=out_dir, dataset=dataset, total_count=total,
        shard_count=len(records), reused_shards=reused, skipped=skipped, resolution=resolution,
        channels=channels, manifest_hash=manifest_hash(out_dir),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class SourceSpec:
    reader: Callable[[Path | None, str | None], Iterator[Item]]
    preprocess: str
    resolution: int  # default training resolution
    mode: str


SOURCES: dict[str, SourceSpec] = {
    "folder": SourceSpec(lambda path, split: read_folder(path), "resize", 64, "RGB"),
    "lsun": SourceSpec(lambda path, split: read_lsun(path), "resize", 128, "RGB"),
    "celeba": SourceSpec(lambda path, split: read_celeba(path), "center_crop_then_resize", 64,
                         "RGB"),
    "cifar10": SourceSpec(lambda path, split: read_cifar10(path, split or "train"), "resize", 32,
                          "RGB"),
    "mnist": SourceSpec(lambda path, split: read_mnist(), "pad", 32, "L"),
    # Up-sampled (bicubic) from 8x8 to the MNIST preset's 32x32: a second, unpaired digit domain.
    "sklearn-digits": SourceSpec(lambda path, split: read_sklearn_digits(), "resize", 32, "L"),
}
BUNDLED = {"mnist": MNIST_SOURCE, "sklearn-digits": "sklearn:load_digits"}  # need no input path
CAT2DOG = SourceSpec(lambda path, split: read_folder(path), "resize_then_center_crop", 64, "RGB")


def convert(
    kind: str, input_path: str | os.PathLike | None, out_dir: str | os.PathLike, *,
    resolution: int | None = None, shard_size: int | None = None, split: str | None = None,
    limit: int | None = None, progress: bool = True, channels: int | None = None,
    labels: bool = False,
) -> ManifestInfo:
    """Convert one source into a shard set in ``out_dir``.

    ``kind`` is one of ``SOURCES`` (cat2dog has one set per domain: see ``convert_cat2dog``).
    ``input_path`` is ignored for mnist. ``split`` is for cifar10 ("train", the default, or
    "test"). ``labels`` (folder only) labels each image by its top-level subfolder. ``limit``
    keeps the first N input items. ``channels`` (1 or 3) overrides the source's colour mode:
    1 stores grayscale, 3 RGB.
    """
    if kind not in SOURCES:
        raise ValueError(f"unknown source kind {kind!r}; valid: {sorted(SOURCES)} "
                         "(cat2dog: use convert_cat2dog)")
    spec = SOURCES[kind]
    if kind in BUNDLED:
        source = BUNDLED[kind]
    elif input_path is None:
        raise ValueError(f"source kind {kind!r} needs an input path")
    else:
        input_path = existing(input_path)
        source = str(input_path)
    if labels and kind != "folder":
        raise ValueError(f"labels from folders apply to folder sources, not {kind!r}")
    dataset = f"{kind}-{split or 'train'}" if kind == "cifar10" else kind
    items = read_folder(input_path, labels=True) if labels else spec.reader(input_path, split)
    return write_shards(
        items, out_dir, dataset=dataset, source=source,
        preprocess=spec.preprocess, resolution=resolution or spec.resolution,
        mode=_mode(channels, spec.mode), shard_size=shard_size, limit=limit, progress=progress,
    )


def _mode(channels: int | None, default: str) -> str:
    if channels is None:
        return default
    if channels not in MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return MODES[channels]


def convert_cat2dog(
    root: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int | None = None,
    shard_size: int | None = None, limit: int | None = None, progress: bool = True,
    channels: int | None = None,
) -> dict[str, ManifestInfo]:
    """One shard set per domain folder present in ``root`` (``out_dir/trainA``, ...)."""
    root = existing(root)
    domains = [d for d in CAT2DOG_DOMAINS if (root / d).is_dir()]
    if not domains:
        raise FileNotFoundError(f"no cat2dog domain folder {list(CAT2DOG_DOMAINS)} in {root}")
    return {
        domain: write_shards(
            CAT2DOG.reader(root / domain, None), storage.join(out_dir, domain),
            dataset=f"cat2dog-{domain}", source=str(root / domain),
            preprocess=CAT2DOG.preprocess, resolution=resolution or CAT2DOG.resolution,
            mode=_mode(channels, CAT2DOG.mode), shard_size=shard_size, limit=limit, progress=progress,
        )
        for domain in domains
    }


def ensure_mnist_shards(out_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """MNIST-5k shards in ``out_dir``, built only when its manifest is missing (fresh checkout)."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).exists():
        convert("mnist", None, out_dir, shard_size=DEFAULT_SHARD_SIZE, progress=progress)
    return out_dir
