"""``PackageTableDataset``: a table shipped as data inside an installed Python package."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

logger = logging.getLogger(__name__)


class PackageTableDataset(AbstractDataset[None, pd.DataFrame]):
    """Reads a CSV that a package ships (e.g. torchxrayvision's RSNA tables) without importing it.

    When the package is not installed, loads an empty DataFrame and logs why, so that callers
    can fall back to another source. Read-only.
    """

    def __init__(
        self,
        *,
        package: str,
        resource: str,
        load_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._package = package
        self._resource = resource
        self._load_args = load_args or {}
        self.metadata = metadata

    def _file(self) -> Path | None:
        spec = importlib.util.find_spec(self._package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self._resource
        return path if path.is_file() else None

    def load(self) -> pd.DataFrame:
        path = self._file()
        if path is None:
            logger.warning("%s/%s is not installed; loading an empty table",
                           self._package, self._resource)
            return pd.DataFrame()
        return pd.read_csv(path, **self._load_args)

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._package}/{self._resource} is package data and read-only")

    def _exists(self) -> bool:
        return self._file() is not None

    def _describe(self) -> dict[str, Any]:
        return {"package": self._package, "resource": self._resource}
