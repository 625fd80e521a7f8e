"""Fake user inputs in their real on-disk formats: image files, CIFAR-10's python pickles, CelebA's
zip and folder, an LSUN lmdb export, cat2dog's domain folders, and torch-fidelity's Inception
weights file. Shared by tests/test_shards.py (the converters) and tests/test_docs_commands.py
(the documented commands); conftest.py loads it by path as the ``fake_inputs`` fixture.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def noise(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8))


def encoded(img, fmt, **kwargs):
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def image_folder(root, n, size=(40, 30), fmt="PNG", ext="png"):
    """``n`` noise images, half of them in a subfolder (nested folders are allowed)."""
    root = Path(root)
    for i in range(n):
        sub = root / ("more" if i % 2 else "")
        write(sub / f"{i:04d}.{ext}", encoded(noise(*size, seed=i), fmt))
    return root


# ------------------------------------------------------------------------------------ CIFAR-10


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 strings, the layout of the official CIFAR-10 batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_dump(obj, f):
    Py2Pickler(f, protocol=2).dump(obj)


def py3_dump(obj, f):
    pickle.dump(obj, f, protocol=4)


DUMPS = {"py2": py2_dump, "py3": py3_dump}


def cifar10(parent, dump=py2_dump, per_batch=2, test_count=3):
    """A fake ``parent/cifar-10-batches-py``: ``per_batch`` images in each of the 5 train batches,
    ``test_count`` in the test batch. Returns (folder, {batch name: HWC uint8 images})."""
    root = Path(parent) / "cifar-10-batches-py"
    root.mkdir(parents=True)
    images = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        n = test_count if name == "test_batch" else per_batch
        hwc = np.random.RandomState(seed).randint(0, 256, (n, 32, 32, 3), np.uint8)
        hwc[0, 0, 0] = (255, 0, 10)  # a pixel whose channel order is unmistakable
        images[name] = hwc
        batch = {
            b"batch_label": name.encode(),
            b"labels": [(seed + i) % 10 for i in range(n)],
            b"data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072),  # R plane, G plane, B plane
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
        }
        with open(root / name, "wb") as f:
            dump(batch, f)
    return root, images


# ------------------------------------------------------------------------ CelebA, LSUN, cat2dog


def celeba(parent, n=3):
    """``parent/img_align_celeba.zip`` and the same ``n`` 178x218 JPEGs extracted in
    ``parent/img_align_celeba/``. Returns (zip, folder)."""
    parent = Path(parent)
    folder, archive = parent / "img_align_celeba", parent / "img_align_celeba.zip"
    parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("img_align_celeba/", b"")
        for i in range(1, n + 1):
            data = encoded(noise(178, 218, i), "JPEG")
            write(folder / f"{i:06d}.jpg", data)
            zf.writestr(f"img_align_celeba/{i:06d}.jpg", data)
    return archive, folder


def lsun(path, entries):
    """An LSUN lmdb export at ``path`` (a folder) holding ``entries``: {key bytes: image bytes}."""
    import lmdb

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26, subdir=True)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
    env.close()
    return Path(path)


def cat2dog(root, counts, size=100):
    """``root/<domain>/<i>.jpg`` for each {domain: count}."""
    root = Path(root)
    for domain, n in counts.items():
        for i in range(n):
            write(root / domain / f"{i}.jpg", encoded(noise(size, size, i), "JPEG"))
    return root


# ------------------------------------------------------------------------- Inception weights


def torch_fidelity_state(module) -> dict:
    """A TorchScript Inception's tensors under torch-fidelity's names: the inverse of
    ``fdrl.eval.inception.torch_fidelity_names``."""
    import torch

    from fdrl.eval.inception import torch_fidelity_names

    params = dict(module.named_parameters())
    state = {}
    for src, dst in torch_fidelity_names().items():
        state[f"{src}.conv.weight"] = params[f"{dst}.weight"].detach().clone()
        state[f"{src}.bn.bias"] = params[f"{dst}.beta"].detach().clone()
        state[f"{src}.bn.running_mean"] = params[f"{dst}.mean"].detach().clone()
        state[f"{src}.bn.running_var"] = params[f"{dst}.var"].detach().clone()
        state[f"{src}.bn.weight"] = torch.ones_like(state[f"{src}.bn.bias"])
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state


def torch_fidelity_weights(path):
    """torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` layout, made from the
    packaged TF Inception (the real file cannot be fetched here)."""
    import torch

    from fdrl.eval.inception import load_inception

    torch.save(torch_fidelity_state(load_inception()[0]), path)
    return Path(path)
