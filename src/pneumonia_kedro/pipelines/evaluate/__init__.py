"""Scores the trained model on the validation split the way the competition did, and more."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
