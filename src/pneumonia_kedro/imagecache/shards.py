"""Where a cache lies (``cache_path``: a mounted folder, never an fsspec URL) and the
sharded image cache: the split's images in parts of ``shard_size`` images, one cache
folder per part, read as one array (``ShardedImages``) by global row.

Layout of a sharded cache folder::

    manifest.json   fingerprint (sources, settings and shard_size), images, shard_size,
                    parts, complete, the build's figures
    index.parquet   one row per patient, global rows (the same table as an unsharded cache)
    part-00000/     rows 0 .. shard_size - 1: an ordinary cache folder of those images
    part-00001/     (manifest.json, images.npy, records/, index.parquet; rows from 0)
    ...

Global row ``r`` is row ``r % shard_size`` of part ``r // shard_size``: every part but the
last holds exactly ``shard_size`` images, so no table is needed to find a row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumonia_kedro.errors import PneumoniaKedroError


class CacheLocationError(PneumoniaKedroError, ValueError):
    """A cache named by a URL that cannot be memory-mapped."""


def cache_path(path: str | Path) -> Path:
    """The folder of a cache named by ``path``: a path, or a ``file://`` URL. The cache is
    memory-mapped, so other fsspec URLs (``s3://``, ``memory://``) are refused: on a cluster
    the folder must be a shared file system mounted at the same path on every node."""
    text = str(path)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if "://" in text or "::" in text:
        raise CacheLocationError(
            f"image cache {text!r}: the cache is memory-mapped, so it needs a folder on a "
            "mounted file system, not an fsspec URL; on a cluster use a shared file system "
            "mounted at the same path on every node (NFS, CephFS, a ReadWriteMany volume) and "
            "give that path")
    return Path(path)


def part_folder(path: Path, part: int) -> Path:
    """The folder of part ``part`` of the sharded cache at ``path``."""
    return path / f"part-{part:05d}"


def part_number(folder: Path) -> int | None:
    """The part a folder holds (``part-00003`` -> 3), None for any other name."""
    name = folder.name
    if name.startswith("part-") and name[5:].isdigit() and len(name) == 10:
        return int(name[5:])
    return None


def part_bounds(images: int, shard_size: int) -> list[tuple[int, int]]:
    """(first row, stop row) of each part of a cache of ``images`` images."""
    return [(first, min(first + shard_size, images))
            for first in range(0, images, shard_size)]


class ShardedImages:
    """The images of a sharded cache as one read-only uint8 array of shape (N, size, size):
    an integer gives one image (a view of its part's memory map, as ``images.npy`` gives),
    a slice or an array of rows gives a new array in the order asked. The parts are
    memory-mapped when first read; pickling keeps only their folders."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, path: str | Path, images: int, image_size: int, shard_size: int
                 ) -> None:
        self.path = Path(path)
        self.shape = (images, image_size, image_size)
        self.shard_size = shard_size
        self._parts: dict[int, np.ndarray] = {}

    def part(self, part: int) -> np.ndarray:
        if part not in self._parts:
            self._parts[part] = np.load(part_folder(self.path, part) / "images.npy",
                                        mmap_mode="r")
        return self._parts[part]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: object) -> np.ndarray:
        if isinstance(key, tuple):  # images[rows, y0:y1, x0:x1]: rows first, then the rest
            rows, rest = key[0], key[1:]
            selected = self[rows]
            return selected[rest] if selected.ndim == 2 else selected[(slice(None), *rest)]
        if isinstance(key, int | np.integer):
            row = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {key} is out of range for {len(self)} cached images")
            return self.part(row // self.shard_size)[row % self.shard_size]
        if isinstance(key, slice):
            return self._gather(np.arange(len(self))[key])
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return self._gather(rows.astype(np.int64, copy=False))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} cached images")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        parts = rows // self.shard_size
        for part in np.unique(parts):
            taken = parts == part
            out[taken] = self.part(int(part))[rows[taken] - part * self.shard_size]
        return out

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        whole = np.concatenate([self.part(k) for k in range(len(part_bounds(
            len(self), self.shard_size)))]) if len(self) else np.empty(self.shape, np.uint8)
        return whole if dtype is None else whole.astype(dtype)

    def __getstate__(self) -> dict:
        return {"path": self.path.absolute(), "shape": self.shape,
                "shard_size": self.shard_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["shape"][0], state["shape"][1],
                      state["shard_size"])
