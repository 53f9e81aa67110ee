"""The memory-mapped image cache as catalog entries: ``ImageCacheDataset`` (the cache) and
``ImageCacheStateDataset`` (what of it is finished, for the node that builds it)."""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError

from pneumonia_kedro.imagecache import (
    CacheChunk,
    CacheState,
    ImageCache,
    cache_path,
    is_complete,
    read_state,
    write_chunk,
)


class ImageCacheDataset(AbstractDataset[CacheChunk, ImageCache]):
    """Saving writes one ``CacheChunk`` that the cache node yielded (a Kedro generator node:
    each yielded chunk is saved in turn); loading gives an ``ImageCache`` whose images stay on
    disk, memory-mapped.

    Each chunk says what to write: a new cache (the folder cleared), decoded rows with their
    records, or the finished index. The dataset keeps no state between saves, so the chunks
    an interrupted run wrote stay and the next run resumes after them. The folder must be on
    a mounted file system (memory mapping): a path or a ``file://`` URL; other fsspec URLs
    are refused when the catalog is built. A sharded cache (``cache.shard_size``) is the same
    folder with one sub-folder per part; loading it gives the same ``ImageCache``.
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = cache_path(path)
        self.metadata = metadata

    def load(self) -> ImageCache:
        if not self._exists():
            raise DatasetError(f"{self._path}: no complete image cache here; run the cache "
                               "pipeline first (kedro run --pipelines cache)")
        return ImageCache(self._path)

    def save(self, data: CacheChunk) -> None:
        write_chunk(self._path, data)

    def _exists(self) -> bool:
        return is_complete(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class ImageCacheStateDataset(AbstractDataset[CacheState, CacheState]):
    """Read-only view of an image cache folder for the node that builds it: the fingerprint
    it was started with and the records of its finished chunks (nothing when there is no
    cache). A separate entry because a node may not load and save the same dataset."""

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = cache_path(path)
        self.metadata = metadata

    def load(self) -> CacheState:
        return read_state(self._path)

    def save(self, data: CacheState) -> None:
        raise DatasetError(f"{self._path}: the cache's state is read-only; the cache node "
                           "writes the cache through its ImageCacheDataset")

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
