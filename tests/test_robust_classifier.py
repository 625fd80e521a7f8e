"""Classifiers for guidance: L2 PGD adversarial training, registration as classifier-<dataset>
with alias and sha256 tags, hash-checked loading."""

from pathlib import Path

import pytest
import torch

from fdrl.eval.classifier import (ClassifierConfig, MnistClassifier, PGDSettings, pgd_l2,
                                  train_classifier)
from fdrl.tracking.classifiers import load_registered_classifier, open_classifier, register_classifier

SMALL = ClassifierConfig(in_shape=(1, 8, 8), num_classes=3, channels=(4, 8), feature_dim=16)


def blobs(n=120, seed=0):
    """Three classes of 8x8 images: a bright blob in a different corner each, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = -torch.ones(n, 1, 8, 8) + 0.2 * torch.randn(n, 1, 8, 8, generator=g)
    for c, (r, k) in enumerate([(0, 0), (0, 4), (4, 2)]):
        x[labels == c, :, r:r + 4, k:k + 4] += 1.5
    return x.clamp(-1, 1), labels, [f"s{i:04d}" for i in range(n)]


def test_pgd_l2_stays_in_the_ball_and_range_and_raises_the_loss():
    torch.manual_seed(0)
    model = MnistClassifier(SMALL).train()
    x, y, _ = blobs(32)
    pgd = PGDSettings(eps=0.5, steps=5)
    adv = pgd_l2(model, x, y, pgd)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # input gradients only
    dist = (adv - x).flatten(1).norm(dim=1)
    assert dist.max() <= 0.5 + 1e-5 and dist.mean() > 0.25
    assert adv.min() >= -1 and adv.max() <= 1
    loss = lambda z: torch.nn.functional.cross_entropy(model.eval()(z), y).item()
    assert loss(adv) > loss(x) + 1e-3
    assert pgd.alpha == pytest.approx(2.5 * 0.5 / 5)
    with pytest.raises(ValueError, match="PGD needs eps > 0"):
        PGDSettings(eps=0.0)


def test_adversarial_training_learns_and_is_seeded():
    x, y, keys = blobs(150)
    run = lambda: train_classifier(x, y, keys, epochs=6, batch_size=16, lr=1e-2, seed=1,
                                   config=SMALL, adversary=PGDSettings(0.3, 3), augment=False,
                                   log=None)
    first = run()
    assert first.train_accuracy > 0.9  # separable blobs, even under a small attack
    assert torch.equal(first.model(x[:8]), run().model(x[:8]))


def test_registered_with_alias_and_hash_checked(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fdrl.tracking.registry import ModelNotFoundError, TamperedArtifactError

    x, y, keys = blobs(90)
    result = train_classifier(x, y, keys, epochs=1, batch_size=16, config=SMALL, log=None)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, number = register_classifier(result, "classifier-blobs", tracking_uri=uri)
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("classifier-blobs", "candidate")
    assert str(version.version) == number
    assert sorted(k for k in version.tags if k.startswith("sha256/")) == [
        "sha256/artifacts/config.json", "sha256/artifacts/model.safetensors",
        "sha256/classifier_pyfunc.py"]
    loaded = load_registered_classifier("models:/classifier-blobs@candidate", tracking_uri=uri)
    assert torch.equal(loaded(x[:4]), result.model(x[:4]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # no tracking_uri: the platform's default
    assert torch.equal(open_classifier("models:/classifier-blobs@candidate")(x[:4]), result.model(x[:4]))
    with pytest.raises(ModelNotFoundError, match="has no alias 'champion'"):
        load_registered_classifier("models:/classifier-blobs@champion", tracking_uri=uri)

    # Overwrite the stored weights: the registry's hash no longer matches, loading is refused.
    root = client.get_model_version_download_uri("classifier-blobs", number)
    stored = Path(root.removeprefix("file://")) / "artifacts" / "model.safetensors"
    assert stored.is_file()
    other = MnistClassifier(SMALL)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(stored))
    with pytest.raises(TamperedArtifactError, match="model.safetensors .* was modified"):
        load_registered_classifier(f"models:/classifier-blobs/{number}", tracking_uri=uri)
