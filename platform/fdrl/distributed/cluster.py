"""The Ray cluster this process works on: started locally, or the one a `ray job submit` runs in."""

from __future__ import annotations

import ray


def connect() -> None:
    """Join the cluster: RAY_ADDRESS or the job's cluster when there is one, else a local Ray."""
    if not ray.is_initialized():
        ray.init()


def gpu_count() -> float:
    connect()
    return ray.cluster_resources().get("GPU", 0)


def has_gpus() -> bool:
    return gpu_count() >= 1


def available_cpus() -> int:
    connect()
    return int(ray.available_resources().get("CPU", 1))
