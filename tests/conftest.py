import os

import pytest

# Set before Ray, MLflow or torch start anywhere in the test session.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module; each module starts and shuts down its own."""
    import ray

    ray.init(num_cpus=2)  # with the dashboard: Train's placement-group cleaner needs its State API
    yield
    ray.shutdown()
