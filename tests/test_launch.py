"""The launcher's driver side: resolve (pure), the flags of every job, --dry-run, and the checks
that run before any worker starts. Real shards on disk; no Ray unless a test says so."""

import dataclasses
import json
import os
import time
from datetime import datetime

import pytest

from fdrl.cli import parse_train_args, train_main
from fdrl.config import INTERNAL_FIELDS, TrainConfig, field_help, user_fields
from fdrl.core.priors import make_simple_prior
from fdrl.workflows.train import RUN_INFO, check_run, choose_gpu, prior_file_shape, resolve


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fdrl.data.writer import convert

    out = tmp_path_factory.mktemp("mnist") / "shards"
    convert("mnist", None, out, shard_size=64, limit=128, progress=False)
    return out


def test_resolve_fills_the_run_and_leaves_its_input_alone(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrainConfig(data=os.path.relpath(shards, tmp_path), dataset="digits", arch="auto",
                      prior="full", net_size="s", batch=8, storage="here")
    before = dataclasses.replace(cfg)
    run = resolve(cfg, now=datetime(2026, 1, 2, 3, 4, 5))
    assert cfg == before
    c = run.config
    assert c.data == str(shards.resolve()) and c.storage == str(tmp_path / "here")
    assert c.run_name == "digits-20260102-030405" and run.run_dir == str(tmp_path / "here" / c.run_name)
    assert c.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert c.arch == "resnet:1x32x32:16,32,64" and run.data_shape == (1, 32, 32)
    assert c.prior_path.startswith(str(tmp_path / "here" / "priors")) and run.prior_to_fit
    assert not (tmp_path / "here").exists()  # resolving writes nothing


def test_fdrl_home_places_runs_priors_and_mlflow_together(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("FDRL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = resolve(TrainConfig(data=str(shards), arch="mnist32", batch=8))
    home = tmp_path / "home"
    assert run.config.storage == str(home / "runs")
    assert run.config.prior_path.startswith(str(home / "runs" / "priors"))
    assert run.config.tracking_uri == f"sqlite:///{home}/mlflow.db"


def test_resume_picks_the_latest_run_of_the_dataset(shards, tmp_path, tiny):
    storage = tmp_path / "runs"
    for i, name in enumerate(["mnist-old", "mnist-new", "other-newest"]):
        (storage / name).mkdir(parents=True)
        (storage / name / RUN_INFO).write_text("{}")
        os.utime(storage / name, (1_000_000 + i, 1_000_000 + i))
    (storage / "mnist-unfinished").mkdir()  # no run info: never started, not resumable
    assert resolve(tiny(shards, tmp_path, steps=2, resume=True)).config.run_name == "mnist-new"
    with pytest.raises(FileNotFoundError, match="no run of 'celeba'"):
        resolve(tiny(shards, tmp_path, steps=2, resume=True, dataset="celeba"))


def test_every_user_field_has_a_flag_with_its_description(capsys):
    descriptions = field_help()
    assert {f.name for f in user_fields()} <= set(descriptions)
    with pytest.raises(SystemExit):
        parse_train_args(TrainConfig(), "desc", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in user_fields():
        assert "--" + f.name.replace("_", "-") in text
    assert "Ray Train workers (one GPU each on GPUs)" in text
    for name in INTERNAL_FIELDS:
        assert "--" + name.replace("_", "-") not in text


@pytest.mark.parametrize("flag", ["--fid-reference=x", "--mlflow-parent-run-id=x", "--fail-at-step=3"])
def test_launcher_internal_fields_are_not_flags(flag):
    with pytest.raises(SystemExit):
        parse_train_args(TrainConfig(), "desc", [flag])


def test_internal_fields_of_the_preset_survive_parsing():
    cfg, _ = parse_train_args(TrainConfig(fid_reference="ref"), "desc", ["--steps", "7"])
    assert cfg.fid_reference == "ref" and cfg.steps == 7


def test_configs_of_older_versions_still_load():
    """Checkpoints and registered models keep the config they were trained with: fields since
    retired are dropped on reading, unknown ones are still refused."""
    old = {**TrainConfig().to_dict(), "mlflow_run_id": "abc", "fail_at_step": -1, "marker_dir": ""}
    assert TrainConfig.from_dict(old) == TrainConfig()
    with pytest.raises(ValueError, match="unknown config fields: bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_hflip_flag_and_gpu_flag_parse():
    assert parse_train_args(TrainConfig(), "d", ["--no-hflip"])[0].hflip is False
    assert parse_train_args(TrainConfig(hflip=False), "d", ["--hflip"])[0].hflip is True
    assert parse_train_args(TrainConfig(), "d", [])[0].gpu == "auto"
    assert parse_train_args(TrainConfig(), "d", ["--gpu"])[0].gpu == "on"
    assert parse_train_args(TrainConfig(), "d", ["--gpu", "off"])[0].gpu == "off"
    assert TrainConfig(gpu=True).gpu == "on" and TrainConfig.from_dict({"gpu": False}).gpu == "off"


def test_dry_run_prints_exactly_the_resolved_run(shards, tmp_path, capsys, tiny):
    cfg = tiny(shards, tmp_path, steps=2, run_name="dry")
    argv = ["--data", str(shards), "--run-name", "dry", "--steps", "2", "--batch", "8"]
    assert train_main(cfg, "desc", argv + ["--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(resolve(cfg).to_dict()))
    assert not (tmp_path / "runs").exists()


def test_mismatched_network_fails_on_the_driver_naming_both_shapes(shards, tmp_path, tiny):
    import ray

    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r"network 'cifar10' takes images of shape \(3, 32, 32\) "
                                         r"but the data in .* has shape \(1, 32, 32\)"):
        train_main(tiny(shards, tmp_path, steps=2, arch="cifar10"), "desc", [])
    assert time.perf_counter() - start < 10
    assert not ray.is_initialized()  # nothing started: no cluster, so no worker


def test_prior_shape_is_read_from_the_file_metadata(shards, tmp_path, tiny):
    wrong = tmp_path / "rgb.safetensors"
    make_simple_prior("uniform", (3, 32, 32), clamp=1.0).save(wrong)
    assert prior_file_shape(wrong) == (3, 32, 32)
    with pytest.raises(ValueError, match=r"prior has shape \(3, 32, 32\) but the data has shape \(1, 32, 32\)"):
        check_run(resolve(tiny(shards, tmp_path, steps=2, prior="uniform", prior_path=str(wrong))))


def test_eval_flags_without_a_classifier_are_refused(shards, tmp_path, tiny):
    with pytest.raises(ValueError, match="--eval-every 5 needs --eval-classifier"):
        resolve(tiny(shards, tmp_path, steps=2, eval_every=5))
    with pytest.raises(FileNotFoundError, match="--eval-classifier .*nowhere: no model.safetensors"):
        check_run(resolve(tiny(shards, tmp_path, steps=2, eval_every=5, eval_classifier=str(tmp_path / "nowhere"))))


def test_unwritable_storage_is_refused(shards, tmp_path, tiny):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=f"storage {blocker}/runs is not writable"):
        check_run(resolve(tiny(shards, tmp_path, steps=2, storage=str(blocker / "runs"))))


def test_gpu_choice():
    assert choose_gpu("auto", 0) is False and choose_gpu("auto", 2) is True
    assert choose_gpu("off", 4) is False and choose_gpu("on", 1) is True
    assert choose_gpu("wait", 0) is True  # the autoscaler's job to add them
    with pytest.raises(ValueError, match="--gpu on, but the Ray cluster has no GPUs"):
        choose_gpu("on", 0)


def test_resuming_with_another_worker_count_is_refused_on_the_driver(shards, tmp_path, tiny):
    run_dir = tmp_path / "runs" / "mnist-a"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_INFO).write_text(json.dumps({"mlflow_run_id": "", "config": {"workers": 2}}))
    with pytest.raises(ValueError, match="trained by 2 workers, this resume asks for 4"):
        check_run(resolve(tiny(shards, tmp_path, steps=2, resume=True, workers=4)))
    check_run(resolve(tiny(shards, tmp_path, steps=2, resume=True, workers=2)))
