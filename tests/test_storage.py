"""fdrl.data.storage against real storage: local folders, a tmpfs that fills up, moto's S3 (with
IAM auth on, so wrong credentials are refused) and an MLflow server whose artifacts land there."""

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from fdrl.data import storage
from fdrl.data.storage import StorageError, StorageNotFoundError

SERVER_TIMEOUT = pytest.mark.timeout(300)  # first use of a server fixture starts it (MLflow ~1 min)


# --- paths, no I/O -----------------------------------------------------------------------------

def test_paths_and_uris(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert storage.is_uri("s3://b/x") and storage.is_uri("gs://b") and storage.is_uri("foo://b")
    assert not storage.is_uri("file:///tmp/x") and not storage.is_uri("data/s3:x")
    assert storage.resolve("data/x") == str(tmp_path / "data" / "x")
    assert storage.resolve("~/x") == os.path.expanduser("~/x")
    assert storage.resolve("file:///tmp/a/../b") == "/tmp/b"
    assert storage.resolve("S3://bucket//a/./b/") == "s3://bucket/a/b"
    assert storage.join("s3://bucket/runs/", "r1", "/ckpt/") == "s3://bucket/runs/r1/ckpt"
    assert storage.join("data", "x", "/y") == os.path.join("data", "x", "y")
    assert storage.name("s3://bucket/a/b.tar") == "b.tar" and storage.name("s3://bucket") == "bucket"
    assert storage.name("/x/y/") == "y"
    assert storage.parent("s3://bucket/a/b") == "s3://bucket/a"
    assert storage.parent("s3://bucket/a") == "s3://bucket" == storage.parent("s3://bucket")
    assert storage.parent("/x/y") == "/x"
    for bad, words in [("s3://", "no bucket"), ("s3://b/../c", "'..'"), ("", "empty"),
                       ("s3://b/x?endpoint_override=h", "query"),
                       ("hdfs://nn/x", "unknown storage scheme 'hdfs://'")]:
        with pytest.raises(StorageError, match=words.replace("?", r"\?")):
            storage.resolve(bad)


def test_errors_survive_pickling():  # how Ray moves an exception from a worker to the driver
    import pickle

    err = pickle.loads(pickle.dumps(StorageNotFoundError("s3://b/x", "no such file", "read", 2)))
    assert isinstance(err, FileNotFoundError) and isinstance(err, StorageError)
    assert str(err) == "cannot read s3://b/x: no such file" and err.errno == 2


def test_unknown_scheme_names_it_and_the_valid_ones():
    with pytest.raises(StorageError) as err:
        storage.check_writable("s4://bucket/runs")
    msg = str(err.value)
    assert "s4://bucket/runs" in msg and "'s4://'" in msg
    assert all(s in msg for s in ("file://", "s3://", "gs://"))
    with pytest.raises(StorageError, match="unknown storage scheme"):
        storage.write_bytes("s4://bucket/x", b"x")  # never a local folder named "s4:"
    assert not Path("s4:").exists()


# --- round trips, on a local folder and on S3 --------------------------------------------------

@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An empty folder: local, or a prefix in a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("s3_server").bucket(), "root")


@SERVER_TIMEOUT
def test_round_trip(root, tmp_path):
    f = storage.join(root, "a", "b.bin")
    assert not storage.exists(f) and storage.listdir(root) == []  # missing folder: empty
    storage.write_bytes(f, b"\x00\x01" * 1000)
    assert storage.read_bytes(f) == b"\x00\x01" * 1000
    assert storage.exists(f) and storage.is_file(f) and not storage.is_dir(f)
    assert storage.is_dir(storage.join(root, "a")) and storage.exists(root)
    storage.write_text(storage.join(root, "a", "c.json"), '{"ü": 1}')
    assert storage.read_text(storage.join(root, "a", "c.json")) == '{"ü": 1}'
    storage.write_bytes(f, b"new")  # overwrite
    assert storage.read_bytes(f) == b"new"
    assert storage.listdir(storage.join(root, "a")) == ["b.bin", "c.json"]
    assert storage.glob(storage.join(root, "a"), "*.json") == [storage.join(root, "a", "c.json")]
    assert storage.mtime(f) > 1e9

    # One file in and out, streamed across several chunks.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    storage.put_file(big, storage.join(root, "big.bin"))
    storage.get_file(storage.join(root, "big.bin"), tmp_path / "back" / "big.bin")
    assert (tmp_path / "back" / "big.bin").read_bytes() == big.read_bytes()

    # A folder tree in and out.
    src = tmp_path / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "sub" / "deeper" / "leaf.txt").write_text("leaf")
    storage.put_dir(src, storage.join(root, "tree"))
    assert storage.listdir(storage.join(root, "tree")) == ["sub", "top.txt"]
    storage.get_dir(storage.join(root, "tree"), tmp_path / "tree-back")
    assert (tmp_path / "tree-back" / "sub" / "deeper" / "leaf.txt").read_text() == "leaf"
    assert (tmp_path / "tree-back" / "top.txt").read_text() == "top"

    # Removal.
    storage.remove(storage.join(root, "a", "c.json"))
    assert storage.listdir(storage.join(root, "a")) == ["b.bin"]
    with pytest.raises(StorageNotFoundError, match="no such file"):
        storage.remove(storage.join(root, "a", "c.json"))
    storage.remove(storage.join(root, "a", "c.json"), missing_ok=True)
    with pytest.raises(StorageError, match="is a folder"):
        storage.remove(storage.join(root, "tree"))
    storage.remove_tree(storage.join(root, "tree"))
    assert not storage.exists(storage.join(root, "tree"))
    assert sorted(storage.listdir(root)) == ["a", "big.bin"]


@SERVER_TIMEOUT
@pytest.mark.parametrize("dest", ["local", "s3"])
def test_interrupted_copy_leaves_nothing(dest, s3_server, tmp_path, monkeypatch):
    """A copy interrupted half-way (Ctrl-C, a Ray task cancel) leaves no file or object at the
    destination and no temporary behind. The bytes come from the real S3 server; only the
    moment of the interrupt is injected."""
    bucket = s3_server.bucket()
    src = storage.join(bucket, "src.bin")
    storage.write_bytes(src, os.urandom(3 << 20))
    target = storage.join(bucket, "out") if dest == "s3" else str(tmp_path / "out")
    real_chunks = storage._chunks

    def interrupted(*args):
        chunks = real_chunks(*args)
        yield next(chunks)  # the first 1 MiB really reaches the destination stream
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_CHUNK", 1 << 20)
    monkeypatch.setattr(storage, "_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.copy_file(src, storage.join(target, "dst.bin"))
    assert storage.listdir(target) == []  # neither dst.bin nor a .dst.bin.*.tmp

    if dest == "s3":
        # Why copy_file uploads to a temporary key: pyarrow completes a stream left by an
        # exception, so the plain way publishes the partial object.
        fs, inner = storage.filesystem(storage.join(target, "plain.bin"))
        with pytest.raises(KeyboardInterrupt), fs.open_output_stream(inner) as out:
            out.write(b"partial")
            raise KeyboardInterrupt
        assert storage.read_bytes(storage.join(target, "plain.bin")) == b"partial"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root); unmounted afterwards."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_one_clear_error_and_keeps_the_old_file(tiny_disk, tmp_path):
    target = str(tiny_disk / "ckpt" / "model.bin")
    storage.write_bytes(target, b"old")
    big = tmp_path / "big.bin"  # on the real disk
    big.write_bytes(b"y" * (2 << 20))
    for write in (lambda: storage.write_bytes(target, b"x" * (2 << 20)),
                  lambda: storage.put_file(big, target)):
        with pytest.raises(StorageError) as err:
            write()
        assert "storage is full" in str(err.value) and target in str(err.value)
        assert err.value.errno == 28  # ENOSPC
        assert storage.read_bytes(target) == b"old"
        assert storage.listdir(str(tiny_disk / "ckpt")) == ["model.bin"]  # no temp file left

    with open(tiny_disk / "filler", "wb", buffering=0) as f:  # now fill it to the last page
        with pytest.raises(OSError):
            while True:
                f.write(b"z" * 4096)
    with pytest.raises(StorageError, match="storage is full") as err:
        storage.check_writable(str(tiny_disk / "runs"))
    assert str(tiny_disk / "runs") in str(err.value)


def test_local_permission_denied(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(locked, 0o555)
    # root may write anywhere: a forked child drops to nobody, the way a job without rights runs.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            storage.check_writable(str(locked / "runs"))
            code = 0
        except StorageError as e:
            os.write(write_end, str(e).encode())
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        msg = pipe.read()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3, msg
    assert "permission denied" in msg and str(locked / "runs") in msg


def _pythonpath() -> str:
    import fdrl
    return os.pathsep.join([str(Path(fdrl.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])


# --- S3: errors, each one clear message naming the URI -----------------------------------------

@SERVER_TIMEOUT
def test_s3_errors_name_the_uri_and_the_cause(s3_server, monkeypatch):
    bucket = s3_server.bucket()
    storage.check_writable(storage.join(bucket, "runs"))  # the good case first
    storage.check_readable(bucket)
    assert storage.listdir(storage.join(bucket, "runs")) == []  # the probe is gone

    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/runs"
    with pytest.raises(StorageNotFoundError, match="bucket 'no-such-bucket-.*' does not exist"):
        storage.check_writable(missing)
    with pytest.raises(StorageError, match=f"{missing}.*bucket .* does not exist"):
        storage.listdir(missing)

    manifest = storage.join(bucket, "data", "manifest.json")
    for check in (storage.check_readable, storage.read_bytes):
        with pytest.raises(FileNotFoundError, match=f"{manifest}: no such file"):
            check(manifest)

    both = (storage.check_writable, storage.check_readable)
    cases = {  # the environment a job might have, the checks to run, what the message must say
        "wrong secret": ({"AWS_SECRET_ACCESS_KEY": "wrong"}, both, "credentials"),
        "unknown key id": ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN0000000000"}, both, "credentials"),
        # Only one check here: the SDK retries a refused connection with backoff (~6 s a call).
        "unreachable": ({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{_closed_port()}"},
                        (storage.check_writable,),
                        "cannot reach the storage endpoint http://127.0.0.1:"),
        # No "no credentials" case: moto answers unsigned requests with HTTP 500, where S3 says
        # 403 AccessDenied (which maps to the same message as a wrong key).
    }
    for case, (env, checks, words) in cases.items():
        with monkeypatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            for check in checks:
                with pytest.raises(StorageError) as err:
                    check(storage.join(bucket, "runs"))
                msg = str(err.value)
                assert words in msg and storage.join(bucket, "runs") in msg, (case, msg)
                assert "\n" not in msg, (case, msg)
    storage.check_writable(storage.join(bucket, "runs"))  # and the right env works again


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


@SERVER_TIMEOUT
def test_filesystem_is_cached_per_bucket_and_environment(s3_server, monkeypatch):
    bucket = s3_server.bucket()
    fs, inner = storage.filesystem(storage.join(bucket, "runs"))
    assert isinstance(fs, pafs.S3FileSystem) and inner == bucket[5:] + "/runs"
    assert storage.filesystem(bucket)[0] is fs
    with fs.open_output_stream(inner + "/direct.txt") as out:  # what Ray Train will do with it
        out.write(b"ray")
    assert storage.read_bytes(storage.join(bucket, "runs", "direct.txt")) == b"ray"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "other")
    assert storage.filesystem(bucket)[0] is not fs  # a changed environment is not ignored
    assert storage.filesystem("/tmp/x") == (storage._LOCAL, "/tmp/x")


@SERVER_TIMEOUT
def test_local_copy_downloads_once(s3_server, tmp_path):
    bucket = s3_server.bucket()
    remote = storage.join(bucket, "priors", "church.safetensors")
    storage.write_bytes(remote, b"v1")
    cache = tmp_path / "cache"
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        storage.local_copy(remote, cache, "abc123"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [cache / "abc123" / "church.safetensors"] * 3
    assert results[0].read_bytes() == b"v1"
    storage.write_bytes(remote, b"v2")  # the same key means the same content: no new download
    assert storage.local_copy(remote, cache, "abc123").read_bytes() == b"v1"
    assert storage.local_copy(remote, cache, "def456").read_bytes() == b"v2"
    assert os.listdir(cache / "abc123") == ["church.safetensors"]  # no temporaries

    folder = storage.join(bucket, "classifier")
    storage.write_text(storage.join(folder, "config.json"), "{}")
    storage.write_bytes(storage.join(folder, "weights", "w.bin"), b"w")
    local = storage.local_copy(folder, cache, "clf")
    assert (local / "weights" / "w.bin").read_bytes() == b"w" and local.name == "classifier"

    assert storage.local_copy(tmp_path / "x.bin", cache, "k") == tmp_path / "x.bin"
    with pytest.raises(ValueError, match="key"):
        storage.local_copy(remote, cache, "../escape")


@SERVER_TIMEOUT
def test_interpreter_exits_after_s3_use(s3_server):
    """pyarrow's S3 finalizer can hang at exit while a filesystem is still referenced
    (apache/arrow#50188); storage drops its cache first."""
    bucket = s3_server.bucket()
    code = ("import sys; from fdrl.data import storage\n"
            "storage.write_bytes(sys.argv[1] + '/x', b'x')\n"
            "assert storage.read_bytes(sys.argv[1] + '/x') == b'x'\n")
    r = subprocess.run([sys.executable, "-c", code, bucket], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": _pythonpath()})
    assert r.returncode == 0, r.stderr


# --- the MLflow server fixture ------------------------------------------------------------------

@SERVER_TIMEOUT
def test_mlflow_server_with_auth_and_s3_artifacts(mlflow_server, tmp_path):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    artifact = tmp_path / "grid.txt"
    artifact.write_text("samples")
    with mlflow_server.credentials():  # admin
        client = MlflowClient(mlflow_server.uri)
        experiment = f"e-{uuid.uuid4().hex[:8]}"
        run = client.create_run(client.create_experiment(experiment))
        client.log_artifact(run.info.run_id, str(artifact))
    # Proxied: the object is in the server's bucket, under <experiment>/<run>/artifacts/.
    run_dir = storage.join(mlflow_server.artifacts, run.info.experiment_id, run.info.run_id)
    assert storage.listdir(storage.join(run_dir, "artifacts")) == ["grid.txt"]
    assert storage.read_text(storage.join(run_dir, "artifacts", "grid.txt")) == "samples"

    for user, password in [("", None), (mlflow_server.admin_user, "wrong-password-123")]:
        with mlflow_server.credentials(user, password):
            with pytest.raises(MlflowException, match="401"):
                MlflowClient(mlflow_server.uri).search_experiments()

    mlflow_server.create_user("reader", "reader-password-1")
    with mlflow_server.credentials("reader", "reader-password-1"):
        names = [e.name for e in MlflowClient(mlflow_server.uri).search_experiments()]
    assert experiment in names  # default_permission READ

    # Killed and restarted on the same port and databases: the run is still there.
    mlflow_server.stop(kill=True)
    mlflow_server.start()
    with mlflow_server.credentials():
        assert MlflowClient(mlflow_server.uri).get_run(run.info.run_id).info.run_id == \
            run.info.run_id
