"""Sends the structured reports and their overlays to a PACS (STOW-RS or C-STORE)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
