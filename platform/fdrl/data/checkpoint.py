"""Training checkpoints as data: safetensors for the weights, ``torch.load(weights_only=True)`` for
the optimizer, scheduler and RNG states, JSON for the config. Nothing is unpickled unsafely.

A checkpoint is complete or it does not count: every file is fsynced, and ``checkpoint.json``,
written last, lists each file's sha256. ``verify_checkpoint`` checks them; a crash or a full
disk mid-write leaves a folder without a valid manifest, which restarts skip in favour of the
previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from fdrl.core.step import TrainState

MANIFEST = "checkpoint.json"
FILES = ("model.safetensors", "ema.safetensors", "state.pt", "meta.json")


class CorruptCheckpointError(ValueError):
    """A checkpoint folder whose files do not match its manifest (or that has none)."""


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(directory: str | Path, state: TrainState, config: dict,
                    rank_states: list[dict], extra: Optional[dict] = None) -> Path:
    """``rank_states``: one dict per worker (RNG states, data position), gathered to rank 0."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.module.state_dict().items()}, str(d / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in state.ema.state_dict().items()}, str(d / "ema.safetensors"))
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "rank_states": rank_states}, d / "state.pt")
    (d / "meta.json").write_text(json.dumps({"step": state.step, "config": config, **(extra or {})}, indent=1))
    write_manifest(d, state.step, FILES)
    return d


def write_manifest(directory: str | Path, step: int, names) -> None:
    """fsync the checkpoint's files ``names``, then write the manifest of their sha256, last."""
    d = Path(directory)
    hashes = {}
    for name in names:
        _fsync(d / name)
        hashes[name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    (d / MANIFEST).write_text(json.dumps({"step": step, "sha256": hashes}, indent=1))
    _fsync(d / MANIFEST)


def verify_checkpoint(directory: str | Path, names=FILES) -> None:
    """Raise ``CorruptCheckpointError`` naming what is wrong unless each of ``names`` matches the
    manifest."""
    d = Path(directory)
    try:
        listed = json.loads((d / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError) as err:
        raise CorruptCheckpointError(f"checkpoint {d} has no readable {MANIFEST} ({err}): "
                                     "it was not completely written") from None
    for name in names:
        try:
            digest = hashlib.sha256((d / name).read_bytes()).hexdigest()
        except OSError as err:
            raise CorruptCheckpointError(f"checkpoint {d}: {name} unreadable ({err})") from None
        if digest != listed.get(name):
            raise CorruptCheckpointError(f"checkpoint {d}: {name} has sha256 {digest[:12]}..., "
                                         f"the manifest says {str(listed.get(name))[:12]}...")


def load_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "meta.json").read_text())


def load_checkpoint(directory: str | Path, state: TrainState, device="cpu") -> tuple[dict, list[dict]]:
    """Verify, then restore ``state`` in place; returns (meta, rank_states)."""
    d = Path(directory)
    verify_checkpoint(d)
    state.module.load_state_dict(load_file(str(d / "model.safetensors"), device=str(device)))
    state.ema.load_state_dict(load_file(str(d / "ema.safetensors"), device=str(device)))
    blob = torch.load(d / "state.pt", map_location=device, weights_only=True)
    state.optimizer.load_state_dict(blob["optimizer"])
    state.scheduler.load_state_dict(blob["scheduler"])
    meta = load_meta(d)
    state.step = int(meta["step"])
    return meta, blob["rank_states"]
