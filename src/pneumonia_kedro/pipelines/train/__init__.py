"""Trains the detector on the cached split and tracks it in MLflow."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
