"""Decodes every DICOM of the split once into a memory-mapped image cache."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
