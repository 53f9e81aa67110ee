"""Patient-level stratified sampling and train/validation split."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
