import pytest

import fdrl  # noqa: F401  (sets the environment defaults before Ray or MLflow start: fdrl/env.py)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module; each module starts and shuts down its own."""
    import ray

    ray.init(num_cpus=2)  # with the dashboard: Train's placement-group cleaner needs its State API
    yield
    ray.shutdown()
