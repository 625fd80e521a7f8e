"""Evaluation: sample-quality metrics, feature networks, and model evaluation along the flow."""
