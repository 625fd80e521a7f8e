"""FDRL: flow-guided density ratio learning, and the Ray/MLflow platform around it.

The method lives in four small modules free of Ray and MLflow:
``divergences`` (Bregman losses and f'), ``flow`` (the Euler-Maruyama flow),
``priors`` (prior distributions and their streaming fit) and ``networks``.
``step`` holds the one training step every trainer calls.
"""

__version__ = "0.1.0"
