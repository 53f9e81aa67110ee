"""The image cache on disk: reading a cache (``ImageCache``, ``read_state``) and writing a
build's chunks (``write_chunk``), one folder or one folder per part (``shards``). No
decoding here."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pneumonia_kedro.boxes import Letterbox
from pneumonia_kedro.errors import PneumoniaKedroError
from pneumonia_kedro.imagecache.shards import (
    ShardedImages,
    cache_path,
    part_bounds,
    part_folder,
    part_number,
)
from pneumonia_kedro.reporting import capped

# Bump when preprocess() or the DICOM conversion changes what it writes, so that old caches
# are rebuilt (3: VOI LUT output range, pixel padding as air).
PREPROCESSING_VERSION = 3
INDEX_COLUMNS = ("patientId", "row", "status", "reason", "flags", "view_position", "height",
                 "width", "size", "scale_x", "scale_y", "offset_x", "offset_y")


@dataclass
class CacheState:
    """What a cache folder holds: the fingerprint it was started with (None: no cache),
    whether it is complete, and the records of its finished chunks; a sharded cache has its
    ``shard_size`` and the state of each part folder there (``parts``, by part number)."""

    path: Path
    fingerprint: str | None = None
    complete: bool = False
    records: list[dict] = field(default_factory=list)
    shard_size: int | None = None
    parts: dict[int, CacheState] = field(default_factory=dict)


@dataclass
class CacheChunk:
    """One piece of a build, as the cache node yields it and its dataset writes it: the
    manifest of a new cache (``start``), decoded ``rows`` (their ``images`` and ``records``),
    or the finished ``index`` with the build's figures (``build``, which marks it complete).
    ``part``: the part folder of a sharded cache it goes to (None: the cache folder)."""

    start: dict | None = None
    rows: list[int] = field(default_factory=list)
    images: np.ndarray | None = None
    records: list[dict] = field(default_factory=list)
    index: pd.DataFrame | None = None
    build: dict | None = None
    part: int | None = None


class ImageCache:
    """A built cache: ``images`` (memory-mapped, read-only; a ``ShardedImages`` over the part
    folders of a sharded cache) and ``index``; picklable by path."""

    def __init__(self, path: str | Path) -> None:
        self.path = cache_path(path)
        self._images: np.ndarray | ShardedImages | None = None
        self._index: pd.DataFrame | None = None

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    @property
    def images(self) -> np.ndarray | ShardedImages:
        if self._images is None:
            manifest = self.manifest
            if manifest.get("shard_size") is not None:
                self._images = ShardedImages(self.path, int(manifest["images"]),
                                             int(manifest["image_size"]),
                                             int(manifest["shard_size"]))
            else:
                self._images = np.load(self.path / "images.npy", mmap_mode="r")
        return self._images

    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            self._index = pd.read_parquet(self.path / "index.parquet")
        return self._index

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def usable(self) -> pd.DataFrame:
        """Index rows of images that decoded (skipped files are left out)."""
        return self.index.loc[self.index["status"] == "ok"].reset_index(drop=True)

    def letterbox(self, patient_id: str) -> Letterbox:
        row = self.index.set_index("patientId").loc[patient_id]
        return self.letterbox_from_record({"patientId": patient_id, **row.to_dict()})

    @staticmethod
    def letterbox_from_record(record: dict) -> Letterbox:
        """The geometry stored in one index row."""
        return Letterbox(
            height=int(record["height"]), width=int(record["width"]), size=int(record["size"]),
            scale_x=float(record["scale_x"]), scale_y=float(record["scale_y"]),
            offset_x=int(record["offset_x"]), offset_y=int(record["offset_y"]),
        )

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        # Absolute: a worker process or Ray actor may start in another folder.
        return {"path": self.path.absolute()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def quality_summary(index: pd.DataFrame) -> dict:
    """The quality gate's flags of a cache: a count per check, and the flags per file
    (capped like every list in the reports)."""
    flags = index["flags"].fillna("") if "flags" in index else pd.Series([], dtype=str)
    flagged = index.loc[flags != "", ["patientId"]].assign(flags=flags[flags != ""])
    counts: dict[str, int] = {}
    for text in flagged["flags"]:
        for check in {item.split(":", 1)[0] for item in text.split("; ")}:
            counts[check] = counts.get(check, 0) + 1
    files = dict(zip(flagged["patientId"], flagged["flags"], strict=True))
    return {"counts": dict(sorted(counts.items())), "files": capped(files)}


def is_complete(path: Path, fingerprint: str | None = None) -> bool:
    """A finished cache at ``path`` (built from ``fingerprint``, when one is given)."""
    manifest = path / "manifest.json"
    if not manifest.is_file() or not (path / "index.parquet").is_file():
        return False
    content = json.loads(manifest.read_text())
    return bool(content.get("complete", False)) and \
        fingerprint in (None, content.get("fingerprint")) and _images_present(path, content)


def _images_present(path: Path, content: dict) -> bool:
    """The images file, or for a sharded cache every part finished with its own: a part
    deleted by hand, or rebuilt by a run that was then killed, is built again."""
    shard_size = content.get("shard_size")
    if shard_size is None:
        return (path / "images.npy").is_file()
    parts = len(part_bounds(int(content.get("images", 0)), int(shard_size)))
    return all(is_complete(part_folder(path, k)) for k in range(parts))


class CacheBusyError(PneumoniaKedroError):
    """Another process is building the cache folder."""


# Build locks this process holds, by lock file: a build takes its lock with its first
# write and keeps it until the cache is complete (or the process ends, which releases it).
_HELD: dict[Path, int] = {}
_HELD_LOCK = threading.Lock()


def _lock_file(path: Path) -> Path:
    """Beside the cache folder, not in it: a new build clears the folder."""
    return path.parent / f".{path.name}.lock"


def _busy(path: Path, lock: Path) -> CacheBusyError:
    holder = lock.read_text().strip() if lock.is_file() else ""
    return CacheBusyError(
        f"another run is building the image cache {path} ({holder or 'lock ' + str(lock)}); "
        "wait for it to finish, then run again: this run would use its cache as it is. Two "
        "runs that need different caches at once need different cache folders (catalog "
        "entries *_image_cache).")


def acquire_build_lock(path: str | Path) -> None:
    """Hold the build lock of the cache at ``path`` (an ``flock`` on a file beside it, which
    the system releases when the process dies), or raise ``CacheBusyError``."""
    lock = _lock_file(Path(path).resolve())
    with _HELD_LOCK:
        if lock in _HELD:
            return
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(Path(path), lock) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        _HELD[lock] = fd


def release_build_lock(path: str | Path) -> None:
    """Let go of the build lock of the cache at ``path``, if this process holds it."""
    with _HELD_LOCK:
        fd = _HELD.pop(_lock_file(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def check_not_building(path: str | Path) -> None:
    """Raise ``CacheBusyError`` when another process holds the build lock of ``path``."""
    lock = _lock_file(Path(path).resolve())
    with _HELD_LOCK:
        if lock in _HELD or not lock.is_file():
            return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(Path(path), lock) from None
    finally:
        os.close(fd)


def read_state(path: str | Path) -> CacheState:
    """What the cache at ``path`` holds: its fingerprint and every finished chunk's records
    (row order), or nothing when there is no cache there. Refused while another process
    builds it (``CacheBusyError``): its state is changing."""
    path = cache_path(path)
    check_not_building(path)
    state = _folder_state(path)
    if state.shard_size is not None:
        # The parts are written under the cache folder's lock: no lock of their own.
        for folder in sorted(path.iterdir()):
            part = part_number(folder)
            if part is not None and folder.is_dir():
                state.parts[part] = _folder_state(folder)
    return state


def _folder_state(path: Path) -> CacheState:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return CacheState(path=path)
    content = json.loads(manifest.read_text())
    if content.get("shard_size") is None and not (path / "images.npy").is_file():
        return CacheState(path=path)  # its images deleted: the records' rows are gone too
    records = []
    for chunk_file in sorted((path / "records").glob("*.json")):
        records.extend(json.loads(chunk_file.read_text()))
    return CacheState(path=path, fingerprint=content["fingerprint"],
                      complete=is_complete(path),
                      records=sorted(records, key=lambda record: record["row"]),
                      shard_size=content.get("shard_size"))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file. No fsync:
    the page cache outlives a killed process, which is the interruption resumed from."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_chunk(path: str | Path, chunk: CacheChunk) -> None:
    """Write one chunk of a build into the cache folder at ``path`` (or into its part folder
    ``chunk.part``): start a new cache (the folder cleared, the image array allocated; a
    sharded cache's own folder holds only its manifest and index), rows into the array and
    then their record (the note that they are done), the index, and last the manifest
    marked complete."""
    path = cache_path(path)
    if chunk.start is None and not chunk.records and chunk.index is None \
            and chunk.build is None:
        return  # an up-to-date cache: nothing to write, no lock to take
    acquire_build_lock(path)  # held from a build's first write until it is complete
    top, path = path, (path if chunk.part is None else part_folder(path, chunk.part))
    if chunk.start is not None and chunk.start.get("shard_size") is not None:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        _write_atomic(path / "manifest.json", json.dumps(chunk.start, indent=2).encode())
    elif chunk.start is not None:
        if path.exists():
            shutil.rmtree(path)
        (path / "records").mkdir(parents=True)
        shape = (chunk.start["images"], chunk.start["image_size"], chunk.start["image_size"])
        partial = path / "images.partial.npy"
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape).flush()
        os.replace(partial, path / "images.npy")
        _write_atomic(path / "manifest.json", json.dumps(chunk.start, indent=2).encode())
    if chunk.records:
        images = np.load(path / "images.npy", mmap_mode="r+")
        rows = np.asarray(chunk.rows)
        if rows[-1] - rows[0] + 1 == len(rows):  # consecutive rows: one slice, no gather
            images[rows[0]:rows[-1] + 1] = chunk.images
        else:
            images[rows] = chunk.images
        # No msync: written pages live in the page cache, which survives the process being
        # killed (the resume case) and reaches the disk by the kernel's writeback. Only a
        # power loss during a build could lose rows already marked done: delete the cache.
        del images
        # Named by the chunk's first row, which no earlier record holds (it was not done).
        _write_atomic(path / "records" / f"{chunk.rows[0]:08d}.json",
                      json.dumps(chunk.records).encode())
    if chunk.index is not None:
        chunk.index.to_parquet(path / "index.partial.parquet", index=False)
        os.replace(path / "index.partial.parquet", path / "index.parquet")
    if chunk.build is not None:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest.update(complete=True, build=chunk.build)
        _write_atomic(path / "manifest.json", json.dumps(manifest, indent=2).encode())
        if chunk.part is None:
            release_build_lock(top)
