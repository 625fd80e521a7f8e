"""A user's own folder of images: grayscale conversion and shard sizes chosen from the set."""

import numpy as np
import pytest
from PIL import Image

from fdrl.data.manifest import open_shard_set, read_manifest
from fdrl.data.stream import StreamStats, iter_samples
from fdrl.data.writer import auto_shard_size, convert

pytestmark = pytest.mark.integration  # starts Ray, a server or a job process


def _digits_folder(root, n):
    from sklearn.datasets import load_digits

    images = (load_digits().images[:n] * (255 / 16)).round().astype(np.uint8)
    root.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img, "L").save(root / f"digit_{i:04d}.png")
    return images


def test_grayscale_folder_round_trips(tmp_path):
    originals = _digits_folder(tmp_path / "photos", 20)
    info = convert("folder", tmp_path / "photos", tmp_path / "shards", resolution=8, channels=1,
                   progress=False)
    shard_set = open_shard_set(tmp_path / "shards")
    assert info.channels == 1 and shard_set.shape == (1, 8, 8)
    read = {key: image for key, _, image in iter_samples(shard_set, StreamStats())}
    assert len(read) == 20
    for i, img in enumerate(originals):
        (image,) = [v for k, v in read.items() if k.endswith(f"digit_{i:04d}")]
        pixels = ((image[0] + 1) * 127.5).round().numpy().astype(np.uint8)
        np.testing.assert_array_equal(pixels, img)


def test_rgb_is_still_the_folder_default_and_channels_is_checked(tmp_path):
    _digits_folder(tmp_path / "photos", 4)
    assert convert("folder", tmp_path / "photos", tmp_path / "rgb", resolution=8,
                   progress=False).channels == 3
    with pytest.raises(ValueError, match="channels must be 1 .* or 3 .*, got 2"):
        convert("folder", tmp_path / "photos", tmp_path / "two", resolution=8, channels=2,
                progress=False)


@pytest.mark.parametrize("n,size", [(1, 1), (100, 13), (1797, 225), (8000, 1000), (10**6, 1000)])
def test_auto_shard_size(n, size):
    assert auto_shard_size(n) == size


def test_a_small_set_is_cut_into_several_shards(tmp_path):
    _digits_folder(tmp_path / "photos", 100)
    info = convert("folder", tmp_path / "photos", tmp_path / "shards", resolution=8, channels=1,
                   progress=False)
    _, meta = read_manifest(tmp_path / "shards")
    assert (info.shard_count, info.total_count, meta["shard_size"]) == (8, 100, 13)


@pytest.mark.timeout(900)
def test_generic_job_trains_one_shard_on_two_workers_and_prints_each_step_once(tmp_path):
    """jobs/fdrl_train.py end to end in its own process (its own local Ray), as a user runs it."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    _digits_folder(tmp_path / "photos", 40)
    convert("folder", tmp_path / "photos", tmp_path / "digits", resolution=8, channels=1,
            shard_size=64, progress=False)
    assert len(open_shard_set(tmp_path / "digits").shards) == 1
    job = Path(__file__).resolve().parents[1] / "jobs" / "fdrl_train.py"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["FDRL_HOME"] = str(tmp_path / "home")
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [sys.executable, str(job), "--data", str(tmp_path / "digits"), "--workers", "2",
         "--steps", "4", "--batch", "8", "--log-every", "1", "--checkpoint-every", "2",
         "--sample-every", "4", "--grid-size", "4", "--flow-steps", "2", "--extra-steps", "1",
         "--decay-steps", "3", "--no-register", "--run-name", "once",
         "--no-fid"],  # the job's end-of-run FID: tests/test_fid_training.py
        env=env, capture_output=True, text=True, timeout=800)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    for step in range(1, 5):
        assert len(re.findall(rf"step {step}/4 loss .* img/s ETA \d+:\d\d:\d\d", text)) == 1, text[-4000:]
    assert "Reporting training result" not in text
    assert "workers: 2 x CPU (gloo) (--gpu auto)" in text
    home = tmp_path / "home"
    assert (home / "mlflow.db").exists() and (home / "runs" / "once" / "fdrl_run.json").exists()
    assert list((home / "runs" / "priors").glob("*.safetensors"))
    assert "final checkpoint:      " + str(home / "runs" / "once") in text


def test_labels_from_class_folders(tmp_path):
    from fdrl.eval.classifier import load_labeled

    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), value, np.uint8), "L").save(tmp_path / "photos" / name / f"{i}.png")
    convert("folder", tmp_path / "photos", tmp_path / "shards", resolution=8, channels=1,
            labels=True, progress=False)
    images, labels, keys = load_labeled(tmp_path / "shards")
    by_key = dict(zip(keys, labels.tolist()))
    assert sorted(by_key.values()) == [0, 0, 0, 1, 1, 1]
    assert all(by_key[k] == (0 if "_cat_" in k else 1) for k in keys)
    (tmp_path / "photos" / "loose.png").write_bytes((tmp_path / "photos" / "cat" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="loose.png is not in a class subfolder"):
        convert("folder", tmp_path / "photos", tmp_path / "shards2", labels=True, progress=False)
