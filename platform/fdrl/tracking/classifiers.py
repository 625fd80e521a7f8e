"""Registered classifiers (the domain feature network, and class guidance's robust classifier):
registered through the one hash-checked path (``registry.register_verified``), loaded back only
after every file matched its sha256 tag. Files: ``model.safetensors`` and ``config.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from fdrl.eval.classifier import (CONFIG_FILE, WEIGHTS_FILE, MnistClassifier, TrainResult,
                                  classifier_from_bytes, load_classifier, save_classifier)
from fdrl.tracking.registry import register_verified, verified_version

CODE = Path(__file__).with_name("classifier_pyfunc.py")
EXPERIMENT = "fdrl-classifiers"


def register_classifier(result: TrainResult, name: str, *, tracking_uri: Optional[str] = None,
                        experiment: str = EXPERIMENT, params: Optional[dict] = None,
                        info: Optional[dict] = None, aliases=("candidate",)) -> tuple[str, str]:
    """A run with the training curve and ``params``, and the classifier registered as a new
    version of ``name`` (alias ``candidate``). Unlike training trackers this fails loudly: a
    registration job whose model did not get registered must not report success.
    Returns (run id, version)."""
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from fdrl.tracking.backend import default_tracking_uri, ensure_experiment, flatten_params

    tracking_uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri)
    tags = {"fdrl.kind": "classifier"}
    if info and info.get("manifest_hash"):
        tags["fdrl.manifest_hash"] = info["manifest_hash"]
    run_id = client.create_run(ensure_experiment(experiment, tracking_uri), run_name=name,
                               tags=tags).info.run_id
    try:
        for k, v in flatten_params(params or {}).items():
            client.log_param(run_id, k, v)
        for h in result.history:
            client.log_metric(run_id, "heldout_accuracy", h["heldout_accuracy"], step=h["epoch"])
            client.log_metric(run_id, "train_loss", h["loss"], step=h["epoch"])
        client.log_metric(run_id, "train_accuracy", result.train_accuracy)
        client.log_metric(run_id, "train_seconds", result.seconds)
        example = np.zeros((1, *result.model.config.in_shape), np.float32)
        with torch.no_grad():
            logits = result.model.eval()(torch.from_numpy(example)).numpy()
        with tempfile.TemporaryDirectory(prefix="fdrl-clf-") as tmp:
            folder = save_classifier(result.model, tmp, {
                "heldout_accuracy": result.heldout_accuracy, "n_train": result.n_train,
                "n_heldout": result.n_heldout, **(info or {})})
            mv = register_verified(
                run_id, name, [folder / CONFIG_FILE, folder / WEIGHTS_FILE], CODE,
                signature=infer_signature(example, logits),
                input_example=example, metadata={"fdrl_kind": "classifier"},
                tags={"heldout_accuracy": f"{result.heldout_accuracy:.4f}", "fdrl.kind": "classifier"},
                tracking_uri=tracking_uri, aliases=aliases)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, str(mv.version)


def load_registered_classifier(uri: str, tracking_uri: Optional[str] = None) -> MnistClassifier:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, every file checked against its sha256
    tag; safetensors and JSON only."""
    with verified_version(uri, tracking_uri) as found:
        model = classifier_from_bytes(found.read(CONFIG_FILE), found.read(WEIGHTS_FILE))
    model.info["model_uri"] = found.ref
    return model


def open_classifier(spec: str, tracking_uri: Optional[str] = None) -> MnistClassifier:
    """A classifier from a folder or a registered ``models:/`` URI."""
    if str(spec).startswith("models:/"):
        return load_registered_classifier(spec, tracking_uri)
    return load_classifier(spec)


def classifier_folder(spec: str, root: str, tracking_uri: Optional[str] = None) -> str:
    """``spec`` as a folder that processes without MLflow access can load (training workers): a
    folder is returned as it is; a ``models:/`` classifier is verified and saved once per version
    as ``root/NAME-vVERSION`` (``root``: a folder or an object-store URI)."""
    if not str(spec).startswith("models:/"):
        return str(spec)
    from fdrl.data import storage
    from fdrl.tracking.registry import _client, registered_version

    version, _ = registered_version(_client(tracking_uri), spec)
    folder = storage.join(root, f"{version.name}-v{version.version}")
    if not storage.is_file(storage.join(folder, WEIGHTS_FILE)):
        model = load_registered_classifier(f"models:/{version.name}/{version.version}", tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            storage.put_dir(save_classifier(model, Path(tmp) / "clf", model.info), folder)
    return folder
