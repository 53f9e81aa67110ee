"""``ImageCacheDataset``: the memory-mapped image cache as one catalog entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from pneumonia_kedro.imagecache import CachePlan, ImageCache, build, is_complete


class ImageCacheDataset(AbstractDataset[CachePlan, ImageCache]):
    """Saving a ``CachePlan`` builds (or resumes, or reuses) the cache in ``path``; loading
    gives an ``ImageCache`` whose images stay on disk, memory-mapped.

    Like a ``PartitionedDataset`` given callables, the node returns what to write and the
    dataset writes it, here incrementally: a rerun with nothing changed decodes nothing.
    The folder must be on a local disk (memory mapping).
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> ImageCache:
        if not self._exists():
            raise DatasetError(f"{self._path}: no complete image cache here; run the cache "
                               "pipeline first (kedro run --pipelines cache)")
        return ImageCache(self._path)

    def save(self, data: CachePlan) -> None:
        build(data, self._path)

    def _exists(self) -> bool:
        return is_complete(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
