"""Validates the labels and class-info CSVs and builds the per-patient table."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
