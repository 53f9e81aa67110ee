"""Trains the image-level opacity classifier that gates the detector's boxes."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
