"""FDRL: flow-guided density ratio learning, and the Ray/MLflow platform around it.

``fdrl.core`` is the methods' maths (no Ray, no MLflow); ``fdrl.data``, ``fdrl.eval``,
``fdrl.distributed`` (Ray) and ``fdrl.tracking`` (MLflow) build on it. docs/architecture.md maps it.
"""

from fdrl import env as _env

_env.apply()  # before any Ray or MLflow import in the entry points that import fdrl first

__version__ = "0.1.0"
