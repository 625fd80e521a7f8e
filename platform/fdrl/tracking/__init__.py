"""The MLflow glue: resilient run tracking and the model registry (safe, hash-checked loading)."""
