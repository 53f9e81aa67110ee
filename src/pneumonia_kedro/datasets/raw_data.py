"""What the raw-data datasets share: outside the demo environment they are read-only."""

from __future__ import annotations

from kedro.io import DatasetError


def refuse_if_read_only(read_only: bool, location: str) -> None:
    """Raise before a raw dataset marked ``read_only`` is written."""
    if read_only:
        raise DatasetError(
            f"{location}: raw data is read-only in this environment; the demo generator "
            "writes it only with --env demo (kedro run --env demo --pipelines demo_data)")
