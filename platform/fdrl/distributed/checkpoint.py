"""Checkpoints as data: safetensors for weights, ``torch.load(weights_only=True)`` for optimizer,
scheduler and RNG states, JSON for the config. Nothing is unpickled unsafely."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fdrl.core.step import TrainState


def save_checkpoint(directory: str | Path, state: TrainState, config: dict,
                    rank_states: list[dict], extra: dict | None = None) -> Path:
    """``rank_states``: one dict per worker (RNG states, data position), gathered to rank 0."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.module.state_dict().items()}, str(d / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in state.ema.state_dict().items()}, str(d / "ema.safetensors"))
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "rank_states": rank_states}, d / "state.pt")
    (d / "meta.json").write_text(json.dumps({"step": state.step, "config": config, **(extra or {})}, indent=1))
    return d


def load_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "meta.json").read_text())


def load_checkpoint(directory: str | Path, state: TrainState, device="cpu") -> tuple[dict, list[dict]]:
    """Restore ``state`` in place; returns (meta, rank_states)."""
    d = Path(directory)
    state.module.load_state_dict(load_file(str(d / "model.safetensors"), device=str(device)))
    state.ema.load_state_dict(load_file(str(d / "ema.safetensors"), device=str(device)))
    blob = torch.load(d / "state.pt", map_location=device, weights_only=True)
    state.optimizer.load_state_dict(blob["optimizer"])
    state.scheduler.load_state_dict(blob["scheduler"])
    meta = load_meta(d)
    state.step = int(meta["step"])
    return meta, blob["rank_states"]
