"""Speed-ups that leave the maths alone: channels_last memory layout and torch.compile.

``compile_network`` compiles a network in place (``nn.Module.compile``: parameter names, the
state dict and the EMA copy are unchanged). Where compile cannot work (no C compiler for the CPU
backend, an unsupported Python, or an error at the first compiled call) it warns once and the
network runs eagerly. On CUDA it uses the "reduce-overhead" mode, which captures CUDA graphs for
the fixed-shape calls of the K-step flow.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Optional

import torch
from torch import nn


class CompileFallbackWarning(RuntimeWarning):
    """torch.compile is unavailable or failed; the network runs eagerly."""


def to_channels_last(net: nn.Module) -> nn.Module:
    """Conv weights in NHWC layout (oneDNN's and cuDNN's fast path); a no-op for nets without
    4-d weights. Inputs need no conversion: a channels_last weight makes the conv's output so."""
    return net.to(memory_format=torch.channels_last)


def compile_mode(device: torch.device | str) -> str:
    """CUDA graphs on GPUs, where launch overhead matters for the flow's small fixed-shape calls."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def compile_problem(device: torch.device | str) -> Optional[str]:
    """Why torch.compile cannot run here, or None."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if torch.device(device).type == "cpu" and not (shutil.which("gcc") or shutil.which("cc")
                                                  or shutil.which("clang")):
        return "no C compiler on PATH for the CPU backend"
    return None


def _warn_fallback(reason: str) -> None:
    warnings.warn(f"torch.compile unavailable ({reason}); the network runs eagerly",
                  CompileFallbackWarning, stacklevel=3)


def compile_network(net: nn.Module, device: torch.device | str = "cpu", backend="inductor") -> bool:
    """Compile ``net`` in place; True when compiled. Falls back to eager with one warning.
    Shapes are static: the flow and the update each see one batch shape."""
    problem = compile_problem(device) if backend == "inductor" else None
    if problem is not None:
        _warn_fallback(problem)
        return False
    mode = compile_mode(device) if backend == "inductor" else None
    net.compile(backend=backend, mode=mode, dynamic=False)
    compiled = net._compiled_call_impl  # set by nn.Module.compile; __call__ uses it when present

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # compile errors surface at the first call of each graph
            if not _is_compile_error(err):
                raise
            net._compiled_call_impl = None
            _warn_fallback(f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
            return net._call_impl(*args, **kwargs)

    net._compiled_call_impl = call
    return True


def _is_compile_error(err: Exception) -> bool:
    """Errors raised by dynamo/inductor (not by the model's own checks, e.g. a bad input shape)."""
    module = type(err).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor"))


def is_compiled(net: nn.Module) -> bool:
    return getattr(net, "_compiled_call_impl", None) is not None
