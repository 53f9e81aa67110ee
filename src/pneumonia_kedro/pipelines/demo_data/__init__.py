"""Writes a demo dataset in the competition's exact layout and formats."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
