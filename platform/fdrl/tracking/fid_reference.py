"""Reference FID statistics in the MLflow artifact store, one run per cache key.

The experiment ``fdrl-fid-reference`` holds a run per key (``fdrl.eval.fid.reference_key``:
manifest hash, weights sha256, sample limit) tagged ``fid_reference_key``, with the statistics
file as its artifact. Another machine on the same tracking server then downloads the statistics
instead of recomputing them. Lookups that fail (no server) return None: the caller computes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger("fdrl.tracking")

EXPERIMENT = "fdrl-fid-reference"
KEY_TAG = "fid_reference_key"


def fetch_reference(key: str, dest_dir: str | Path, tracking_uri: Optional[str] = None) -> Optional[Path]:
    """Download the statistics stored under ``key`` into ``dest_dir``; None when there are none."""
    from mlflow.tracking import MlflowClient

    from fdrl.tracking.backend import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], f"tags.{KEY_TAG} = '{key}' and attributes.status = 'FINISHED'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if not runs:
            return None
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        local = client.download_artifacts(runs[0].info.run_id, f"{key}.safetensors", str(dest))
        return Path(local)
    except Exception as err:  # an unreachable store must not stop an evaluation
        log.warning("FID reference lookup in MLflow failed (%s: %s); computing it", type(err).__name__, err)
        return None


def store_reference(path: str | Path, key: str, tracking_uri: Optional[str] = None,
                    params: Optional[dict] = None) -> Optional[str]:
    """Log the statistics file as the artifact of a new run tagged with ``key``; its run id."""
    from fdrl.tracking.tracker import Tracker, default_tracking_uri

    with Tracker(EXPERIMENT, run_name=key, tracking_uri=tracking_uri or default_tracking_uri(),
                 tags={KEY_TAG: key}) as t:
        if params:
            t.log_params(params)
        t.log_artifact(path)
        return t.run_id
