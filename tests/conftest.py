import os

import pytest

import fdrl  # noqa: F401  (sets the environment defaults before Ray or MLflow start: fdrl/env.py)

# A user's own settings would point the tests at their tracking store, home or Ray cluster: the
# suite runs on what it starts itself.
for _name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FDRL_HOME", "RAY_ADDRESS"):
    os.environ.pop(_name, None)

# Tests that start Ray, a server or a job process are "integration" tests: the fast lane
# (./dev test -m "not integration") leaves them out. A test is one if it uses one of these
# fixtures, or if its module says so (pytestmark) because it starts them itself.
INTEGRATION_FIXTURES = {"ray_cluster", "s3_server", "mlflow_server", "fresh_mlflow_server",
                        "train", "hooks"}


def pytest_sessionstart(session):
    """Forget a dead Ray cluster that advertised itself in /tmp/ray/ray_current_cluster (a
    simulated cluster or `ray start` head killed before its clean-up): a job's plain ray.init()
    would try to join it and fail instead of starting its own Ray. A live one is left alone."""
    import socket
    from pathlib import Path

    advert = Path("/tmp/ray/ray_current_cluster")
    try:
        host, port = advert.read_text().strip().rsplit(":", 1)
    except (OSError, ValueError):
        return
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        advert.unlink(missing_ok=True)


def pytest_collection_modifyitems(config, items):
    """Mark integration tests; leave slow tests out unless the -m expression names them."""
    wants_slow = "slow" in (config.option.markexpr or "") and "not slow" not in config.option.markexpr
    keep, dropped = [], []
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("slow") and not wants_slow:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module; each module starts and shuts down its own."""
    import ray

    # address="local": a new Ray of this module's own. With no address, ray.init() joins any Ray
    # found running on the machine (another session's), and fails when given num_cpus.
    ray.init(address="local", num_cpus=2)  # with the dashboard: Train's PG cleaner needs its State API
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def labelled_mnist(tmp_path_factory):
    """256 MNIST digits as labelled shards and a 1-epoch feature classifier on them:
    dict(shards=folder, classifier=folder)."""
    from fdrl.data.writer import convert
    from fdrl.eval.classifier import load_labeled, save_classifier, train_classifier

    tmp = tmp_path_factory.mktemp("labelled-mnist")
    convert("mnist", None, tmp / "shards", shard_size=64, limit=256, progress=False)
    images, labels, keys = load_labeled(tmp / "shards")
    classifier = save_classifier(train_classifier(images, labels, keys, epochs=1, log=None).model,
                                 tmp / "clf")
    return dict(shards=tmp / "shards", classifier=classifier)


@pytest.fixture(scope="session")
def register_random_model():
    """A function that saves a randomly initialised FDRL network of ``cfg.arch`` as a training
    checkpoint under ``root``, fits a full prior on ``prior_images`` if given, and registers both
    as ``name``@candidate in ``uri``. Returns (state, checkpoint dir, prior path or None)."""
    import torch

    from fdrl.core.networks import build_network
    from fdrl.core.priors import Moments, fit_full
    from fdrl.core.step import make_state
    from fdrl.data.checkpoint import save_checkpoint
    from fdrl.tracking.registry import log_fdrl_model
    from fdrl.tracking.tracker import Tracker

    def register(root, uri, name, cfg, prior_images=None, seed=0):
        torch.manual_seed(seed)
        state = make_state(build_network(cfg.arch), lr=1e-3)
        ckpt = save_checkpoint(root / f"ckpt-{name}", state, cfg.to_dict(), [{}])
        prior_path = None
        if prior_images is not None:
            prior_path = root / f"prior-{name}.safetensors"
            shape = tuple(prior_images.shape[1:])
            fit_full(Moments.zeros(prior_images[0].numel()).update(prior_images), shape,
                     clamp=1.0).save(prior_path)
        with Tracker("unit", run_name=name, tracking_uri=uri) as tracker:
            log_fdrl_model(tracker.run_id, ckpt, prior_path, cfg.to_dict(), name, uri)
        return state, ckpt, prior_path

    return register


@pytest.fixture(scope="session")
def load_job():
    """A function that imports ``jobs/<name>.py`` as a module, so a test can call its ``main``."""
    import importlib.util
    from pathlib import Path

    jobs = Path(__file__).resolve().parents[1] / "jobs"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"job_{name}", jobs / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def register_toy_generators():
    """A function that registers two random 2D generators in a fresh sqlite store under ``root``:
    ``gan-<suffix>`` (generator and discriminator) and ``flow-<suffix>`` (generator only, the
    same network). Returns dict(root, uri, run_id)."""
    import torch

    from fdrl.core.generator_nets import build_net
    from fdrl.tracking.generators import log_generator
    from fdrl.tracking.tracker import Tracker

    g_spec = {"arch": "mlp", "in_dim": 2, "out_dim": 2, "width": 32, "depth": 2}
    d_spec = {"arch": "mlp", "in_dim": 2, "out_dim": 1, "width": 32, "depth": 2}

    def register(root, suffix):
        uri = f"sqlite:///{root}/mlflow.db"
        run_id = Tracker("gan-train", run_name="gan", tracking_uri=uri).run_id
        torch.manual_seed(0)
        g, d = build_net(g_spec), build_net(d_spec)
        info = {"dataset": "25gaussians"}
        log_generator(run_id, f"gan-{suffix}", "gan", 2, (2,),
                      {"generator": (g_spec, g), "discriminator": (d_spec, d)}, info, tracking_uri=uri)
        log_generator(run_id, f"flow-{suffix}", "flow", 2, (2,), {"generator": (g_spec, g)}, info,
                      tracking_uri=uri)
        return dict(root=root, uri=uri, run_id=run_id)

    return register


@pytest.fixture(scope="session")
def fake_inputs():
    """tests/fake_inputs.py: builders of user inputs in their real on-disk formats (image folders,
    CIFAR-10 pickles, CelebA zip/folder, LSUN lmdb, cat2dog domains, torch-fidelity weights)."""
    return _test_module("fake_inputs.py")


@pytest.fixture(scope="session")
def hooks():
    """tests/train_hooks.py: test-only wrappers of the production training loop, registered to
    be pickled by value so Ray workers (which cannot import test modules) receive them whole."""
    import cloudpickle

    module = _test_module("train_hooks.py")
    cloudpickle.register_pickle_by_value(module)
    return module


@pytest.fixture(scope="session")
def tiny():
    """``tiny(data, root, **overrides)``: a 4-step, 2-worker MNIST training config, its runs and
    its sqlite MLflow store under ``root``, checkpoints every 2 steps."""
    from fdrl.config import TrainConfig

    def config(data, root, **overrides) -> TrainConfig:
        cfg = dict(data=str(data), dataset="mnist", arch="mnist32", prior="full", steps=4, batch=8,
                   workers=2, lr=1e-3, decay_steps=[3], flow_steps=2, extra_steps=1, log_every=1,
                   checkpoint_every=2, sample_every=2, grid_size=4, max_failures=1,
                   storage=str(root / "runs"), tracking_uri=f"sqlite:///{root}/mlflow.db")
        return TrainConfig(**{**cfg, **overrides})

    return config


@pytest.fixture(scope="session")
def train():
    """``train(cfg, **kw)``: resolve, check and run a training config as a job does."""
    from fdrl.workflows.train import check_run, resolve, run_training

    def run(cfg, **kwargs):
        return run_training(check_run(resolve(cfg)), **kwargs)

    return run


# --- Object storage and an MLflow server with auth (tests/servers.py) -------------------------

def _servers():
    return _test_module("servers.py")


def _test_module(filename: str):
    """tests/<filename> as a module, loaded once by path: with --import-mode=importlib, and another
    installed package named `tests` (torch-fidelity's), `import tests.<name>` is unreliable."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "fdrl_test_" + filename.removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 (moto) with IAM auth on, for the session. Exports AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 (restored afterwards).
    Attributes: .endpoint, .access_key, .secret_key, .env(); .bucket(name=None) -> "s3://name"
    creates a bucket; .list_uploads(bucket) lists unfinished multipart uploads."""
    server = _servers().S3Server(tmp_path_factory.mktemp("s3-server")).start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in server.env().items():
                mp.setenv(key, value)
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """An MLflow tracking server with basic auth (sqlite in a temp folder, artifacts proxied to a
    fresh bucket on ``s3_server``). Attributes: .uri, .admin_user, .admin_password, .artifacts
    (the bucket URI), .create_user(name, password), .credentials(user=None, password=None) (a
    context manager setting MLFLOW_TRACKING_USERNAME/PASSWORD; the admin by default),
    .stop(kill=True) and .start() (same port and databases)."""
    server = _servers().MlflowServer(tmp_path_factory.mktemp("mlflow-server"),
                                     s3_server.bucket("mlflow-artifacts"), s3_server.env())
    try:
        yield server.start()
    finally:
        server.stop(kill=True)  # its files are temporary: nothing to shut down cleanly for


@pytest.fixture(scope="module")
def fresh_mlflow_server(s3_server, tmp_path_factory):
    """An MLflow server like ``mlflow_server``, new for one module: no users, experiments or
    models that other modules made (a user's permissions then start as on a new server)."""
    server = _servers().MlflowServer(tmp_path_factory.mktemp("mlflow-fresh"), s3_server.bucket(),
                                     s3_server.env())
    try:
        yield server.start()
    finally:
        server.stop(kill=True)
