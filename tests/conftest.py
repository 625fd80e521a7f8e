import pytest

import fdrl  # noqa: F401  (sets the environment defaults before Ray or MLflow start: fdrl/env.py)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module; each module starts and shuts down its own."""
    import ray

    ray.init(num_cpus=2)  # with the dashboard: Train's placement-group cleaner needs its State API
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def register_random_model():
    """A function that saves a randomly initialised FDRL network of ``cfg.arch`` as a training
    checkpoint under ``root``, fits a full prior on ``prior_images`` if given, and registers both
    as ``name``@candidate in ``uri``. Returns (state, checkpoint dir, prior path or None)."""
    import torch

    from fdrl.core.networks import build_network
    from fdrl.core.priors import Moments, fit_full
    from fdrl.core.step import make_state
    from fdrl.distributed.checkpoint import save_checkpoint
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
