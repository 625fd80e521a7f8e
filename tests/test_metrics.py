"""fdrl.eval.metrics (Fréchet distance, KID, precision/recall, streamed statistics), the FID
weights check, and the digit classifier (training, MLflow registration, safetensors round trip)."""

import os

import numpy as np
import pytest
import torch
from scipy import linalg

from fdrl.data.stream import shard_batches
from fdrl.eval.inception import INCEPTION_KEYS, check_inception_weights
from fdrl.eval.metrics import (domain_features, feature_metrics, feature_moments, frechet_distance,
                               frechet_distance_from_moments, gaussian_stats, kid, precision_recall)
from fdrl.core.priors import Moments


def _orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def _sqrtm_reference(mu1, s1, mu2, s2):
    """The textbook formula with scipy's sqrtm, for well-conditioned inputs only."""
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------ Fréchet distance


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    sd1, sd2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(sd1**2 + sd2**2 - 2 * sd1 * sd2)
    got = frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_commuting_full_covariances_closed_form():
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a b).
    d = 40
    q = _orthogonal(d, 1)
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.01, 3, d), rng.uniform(0.01, 3, d)
    mu1, mu2 = rng.normal(size=d), np.zeros(d)
    expected = mu1 @ mu1 + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(torch.tensor(mu1), torch.tensor(q @ np.diag(a) @ q.T),
                           mu2, q @ np.diag(b) @ q.T)  # torch and numpy inputs both work
    assert got == pytest.approx(expected, rel=1e-9)


def test_fd_matches_sqrtm_on_general_covariances():
    rng = np.random.default_rng(3)
    d = 30
    x, y = rng.standard_normal((d, 2 * d)), rng.standard_normal((d, 2 * d))
    s1, s2 = x @ x.T / d + 0.1 * np.eye(d), y @ y.T / d + 0.1 * np.eye(d)  # not commuting
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        _sqrtm_reference(mu1, s1, mu2, s2), rel=1e-9)
    # Symmetric in its two arguments, and 0 for identical Gaussians.
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_fd_near_singular_covariances_stay_finite_and_exact():
    # Commuting covariances where most eigenvalues are 0 or ~1e-14: the closed form still holds.
    d = 64
    q = _orthogonal(d, 4)
    rng = np.random.default_rng(5)
    a, b = np.zeros(d), np.zeros(d)
    a[:8], b[4:12] = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    a[20:30], b[25:35] = 1e-14, 1e-14
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_fd_of_sample_covariances_with_fewer_samples_than_dimensions():
    # 20 samples in 100 dimensions: both covariances are singular (rank 19). The result is finite,
    # >= 0 and agrees with sqrtm on the same matrices made regular by a tiny diagonal offset.
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((20, 100)), rng.standard_normal((20, 100)) + 0.5
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    got = frechet_distance(m1, s1, m2, s2)
    eps = 1e-6 * np.eye(100)
    ref = _sqrtm_reference(m1, s1 + eps, m2, s2 + eps)
    assert np.isfinite(got) and got > 0
    assert got == pytest.approx(ref, rel=1e-3)


def test_fd_rejects_bad_shapes_and_nans():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), np.eye(2))


def test_fd_from_streamed_moments_equals_all_at_once():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((1000, 16)) @ rng.standard_normal((16, 16)) + 1.0
    b = rng.standard_normal((700, 16)) * 1.5
    direct = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    # a in uneven batches, b from two workers' partial statistics merged.
    ma = feature_moments(torch.tensor(a[i:i + 97]) for i in range(0, 1000, 97))
    mb = Moments.zeros(16).update(torch.tensor(b[:300])).merge(
        Moments.zeros(16).update(torch.tensor(b[300:])))
    assert ma.count == 1000 and mb.count == 700
    assert frechet_distance_from_moments(ma, mb) == pytest.approx(direct, rel=1e-10)
    mean, cov = gaussian_stats(ma)
    np.testing.assert_allclose(cov, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ KID


def _mmd2_unbiased(x, y):
    d = x.shape[1]
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def test_kid_is_the_unbiased_cubic_mmd():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((50, 8)), rng.standard_normal((50, 8)) + 0.3
    mean, std = kid(x, y, subsets=3, subset_size=50)  # the whole sets each time
    assert mean == pytest.approx(_mmd2_unbiased(x, y), rel=1e-12)
    assert std == pytest.approx(0, abs=1e-12)


def test_kid_same_distribution_near_zero_and_shift_positive():
    rng = np.random.default_rng(9)
    d = 32
    a, b = rng.standard_normal((2000, d)), rng.standard_normal((2000, d))
    same_mean, same_std = kid(a, b, subsets=50, subset_size=500, seed=1)
    assert abs(same_mean) < 3 * same_std + 1e-4
    shifted_mean, shifted_std = kid(a, b + 0.5, subsets=50, subset_size=500, seed=1)
    assert shifted_mean > 10 * max(same_std, abs(same_mean))
    assert shifted_mean > 5 * shifted_std
    # Larger requested subsets than samples are capped, not an error.
    assert np.isfinite(kid(a[:100], b[:80], subsets=2, subset_size=1000)[0])
    with pytest.raises(ValueError, match="dimensions"):
        kid(a, b[:, :5])


def test_precision_recall():
    rng = np.random.default_rng(10)
    real = rng.standard_normal((500, 4))
    p, r = precision_recall(real, rng.standard_normal((500, 4)), k=3)
    assert p > 0.8 and r > 0.8
    # A generator collapsed onto a small region of the data: precise but no recall.
    p, r = precision_recall(real, 0.05 * rng.standard_normal((500, 4)), k=3)
    assert p > 0.95 and r < 0.2
    # Disjoint supports: neither.
    p, r = precision_recall(real, rng.standard_normal((500, 4)) + 50, k=3)
    assert p == 0 and r == 0


def test_domain_features_streams_and_truncates():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5)
    x = torch.randn(100, 3, 2, 2)

    def fn(batch):
        return lin(batch.flatten(1))
    moments, feats = domain_features(fn, (x[i:i + 30] for i in range(0, 100, 30)), max_samples=70)
    expected = lin(x[:70].flatten(1)).detach()
    assert moments.count == 70 and feats.shape == (70, 5)
    torch.testing.assert_close(feats, expected)
    np.testing.assert_allclose(gaussian_stats(moments)[1],
                               np.cov(expected.double().numpy(), rowvar=False), rtol=1e-5, atol=1e-7)
    out = feature_metrics(fn, [x[:50]], [x[50:]], kid_subset_size=40, kid_subsets=5)
    assert set(out) >= {"fd", "kid_mean", "kid_std", "precision", "recall"}
    assert out["n_samples"] == 50
    fa, fb = (fn(b).detach().double().numpy() for b in (x[:50], x[50:]))
    want = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert out["fd"] == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------- FID weights check


def _fake_inception_state(shapes=INCEPTION_KEYS):
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_wrong_fid_weights_are_refused(tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_bytes(b"this is not a weights file" * 100)
    with pytest.raises(ValueError, match="not a loadable"):
        check_inception_weights(junk)

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048), "other": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError) as info:
        check_inception_weights(wrong)
    assert "Conv2d_1a_3x3.conv.weight" in str(info.value) and "(10, 2048)" in str(info.value)

    class Evil:  # a pickle that would run code: refused by weights_only loading
        def __reduce__(self):
            return (os.system, ("true",))
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, evil)
    with pytest.raises(ValueError, match="not a loadable"):
        check_inception_weights(evil)

    ok = tmp_path / "ok.pth"
    torch.save(_fake_inception_state(), ok)
    check_inception_weights(ok)


# ------------------------------------------------------------------------- shard reading


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    from fdrl.data.writer import convert

    out = tmp_path_factory.mktemp("mnist") / "shards"
    convert("mnist", None, out, shard_size=100, limit=5000, progress=False)
    return out


def test_shard_batches(mnist):
    from fdrl.data.manifest import open_shard_set

    batches = list(shard_batches(mnist, 256, limit=600))
    assert [len(b) for b in batches] == [256, 256, 88]
    assert batches[0].shape[1:] == (1, 32, 32) and batches[0].min() >= -1 and batches[0].max() <= 1
    assert sum(len(b) for b in shard_batches(mnist, 1000)) == open_shard_set(mnist).total


# ---------------------------------------------------------------------------- classifier


def test_classifier_trains_registers_and_round_trips(mnist, tmp_path):
    from mlflow.tracking import MlflowClient

    from fdrl.eval.classifier import load_labeled, strided_subset, train_classifier
    from fdrl.tracking.classifiers import load_registered_classifier, register_classifier

    images, labels, keys = load_labeled(mnist)
    assert images.shape == (5000, 1, 32, 32) and sorted(labels.unique().tolist()) == list(range(10))
    idx = strided_subset(len(images), 600)
    assert (torch.bincount(labels[idx], minlength=10) >= 40).all()  # every digit well represented
    result = train_classifier(images[idx], labels[idx], [keys[i] for i in idx.tolist()],
                              epochs=3, batch_size=16, log=None)
    assert result.n_train + result.n_heldout == 600 and result.n_heldout > 20
    assert result.heldout_accuracy > 0.3  # 3 short epochs on ~550 digits (0.84); chance is 0.1

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id, number = register_classifier(result, "test-clf", tracking_uri=uri,
                                         params={"epochs": 1}, info={"manifest_hash": "abc"})
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("test-clf", number)
    assert version.run_id == run_id
    assert float(version.tags["heldout_accuracy"]) == pytest.approx(result.heldout_accuracy, abs=1e-4)
    assert {"sha256/artifacts/config.json", "sha256/artifacts/model.safetensors",
            "sha256/classifier_pyfunc.py"} <= set(version.tags)
    run = client.get_run(run_id)
    assert run.data.metrics["heldout_accuracy"] == pytest.approx(result.heldout_accuracy)
    assert run.info.status == "FINISHED" and run.data.tags["fdrl.manifest_hash"] == "abc"

    x = images[:16]
    expected_logits, expected_features = result.model(x), result.model.features(x)
    for source in (f"models:/test-clf/{number}", "models:/test-clf@candidate"):
        loaded = load_registered_classifier(source, tracking_uri=uri)
        assert not loaded.training
        assert torch.equal(loaded(x), expected_logits)
        assert torch.equal(loaded.features(x), expected_features)
        assert loaded.info["heldout_accuracy"] == pytest.approx(result.heldout_accuracy)
    assert expected_features.shape == (16, 128)
    # A second registration is version 2 of the same model.
    assert register_classifier(result, "test-clf", tracking_uri=uri)[1] == "2"
    with pytest.raises(ValueError, match="expects"):
        loaded.features(torch.zeros(2, 3, 32, 32))


def test_classifier_local_folder_round_trip(tmp_path):
    from fdrl.eval.classifier import ClassifierConfig, MnistClassifier, load_classifier, save_classifier

    torch.manual_seed(1)
    model = MnistClassifier(ClassifierConfig(channels=(8, 8, 16), feature_dim=32)).eval()
    save_classifier(model, tmp_path / "clf", {"note": "x"})
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    loaded = load_classifier(tmp_path / "clf")
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), model(x)) and loaded.features(x).shape == (5, 32)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing")


@pytest.mark.slow
def test_classifier_full_accuracy(mnist):
    from fdrl.eval.classifier import load_labeled, train_classifier

    result = train_classifier(*load_labeled(mnist), log=None)
    assert result.heldout_accuracy >= 0.97
