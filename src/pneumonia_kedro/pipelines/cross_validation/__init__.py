"""The cross_validation pipeline: k folds as Kedro namespaces, out-of-fold tuning, and the
fold ensemble."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
