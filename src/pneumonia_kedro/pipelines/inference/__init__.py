"""Predicts on any folder of DICOMs and writes a Kaggle submission."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
