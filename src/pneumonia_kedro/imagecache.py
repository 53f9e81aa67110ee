"""The image cache: every DICOM decoded once into one memory-mapped uint8 array per split.

Layout of a cache folder::

    manifest.json   what it was built from (fingerprint) and whether it is complete
    images.npy      uint8 array (N, size, size), opened memory-mapped
    records/        one JSON file per finished chunk: its rows' metadata; the only record of
                    what is done (a kill between two files cannot make them disagree)
    index.parquet   one row per patient: row, status, reason, original size, letterbox

Building is incremental: a cache whose fingerprint (sources, image size, preprocessing version)
matches is reused and only rows not yet done are decoded, so a killed build resumes and ends
identical to an uninterrupted one. Workers decode in separate processes and write their rows
straight into the memory map; only small metadata travels back, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pneumonia_kedro.boxes import Letterbox
from pneumonia_kedro.config import AT_LEAST_ONE, NON_NEGATIVE, Range
from pneumonia_kedro.dicom import ColourImageError, DicomFolder, DicomImage, decode
from pneumonia_kedro.dicom.quality import InputQualityError, QualityConfig, colour_result
from pneumonia_kedro.dicom.quality import check as quality_check
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.reporting import capped

logger = logging.getLogger(__name__)

# Bump when preprocess() or the DICOM conversion changes what it writes, so that old caches
# are rebuilt (3: VOI LUT output range, pixel padding as air).
PREPROCESSING_VERSION = 3
INDEX_COLUMNS = ("patientId", "row", "status", "reason", "flags", "view_position", "height",
                 "width", "size", "scale_x", "scale_y", "offset_x", "offset_y")


@dataclass(frozen=True)
class CacheConfig:
    """How images are cached: square size, worker processes, what to do with files that do
    not decode (``on_error``) and with files the input quality gate flags (``quality``)."""

    RANGES = {"image_size": Range(16), "workers": NON_NEGATIVE, "chunk_size": AT_LEAST_ONE}

    image_size: int = 512
    workers: int = 2
    chunk_size: int = 32
    on_error: Literal["error", "skip"] = "error"
    progress: bool = True
    quality: QualityConfig = field(default_factory=QualityConfig)


@dataclass
class CachePlan:
    """What a cache must hold: these patients' files from this folder, preprocessed so."""

    folder: DicomFolder
    patient_ids: list[str]
    config: CacheConfig
    sources: list[tuple[str, int, float]] = field(default_factory=list)

    def fingerprint(self) -> str:
        payload = json.dumps({
            "version": PREPROCESSING_VERSION,
            "image_size": self.config.image_size,
            # What is refused or skipped changes what the cache holds.
            "on_error": self.config.on_error,
            "quality": asdict(self.config.quality),
            "root": self.folder.root,
            "sources": self.sources,
        }, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def plan(folder: DicomFolder, patient_ids: Sequence[str], config: CacheConfig) -> CachePlan:
    """A plan for ``patient_ids`` (in order); each source is identified by size and mtime."""
    fs = folder.filesystem
    sources = []
    for patient_id in patient_ids:
        if patient_id in folder:
            info = fs.info(folder.files[patient_id])
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            sources.append((patient_id, int(info.get("size", -1)), str(mtime)))
        else:
            sources.append((patient_id, -1, "missing"))
    return CachePlan(folder=folder, patient_ids=list(patient_ids), config=config,
                     sources=sources)


def preprocess(image: DicomImage | np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Area-average resize so the longer side is ``size``, then centre on a black square.

    The geometry refers to the file's own size, also when the pixels were decoded reduced.
    """
    if isinstance(image, DicomImage):
        pixels, height, width = image.pixels, image.height, image.width
    else:
        pixels, (height, width) = image, image.shape
    box = Letterbox.fit(height, width, size)
    if (box.resized_height, box.resized_width) == pixels.shape:
        if pixels.shape == (size, size):
            return pixels, box  # already the cache's square size: nothing to pad
        resized = pixels
    else:
        interpolation = cv2.INTER_AREA if box.resized_height < pixels.shape[0] \
            else cv2.INTER_LINEAR
        resized = cv2.resize(pixels, (box.resized_width, box.resized_height),
                             interpolation=interpolation)
    square = np.zeros((size, size), dtype=np.uint8)
    square[box.offset_y:box.offset_y + box.resized_height,
           box.offset_x:box.offset_x + box.resized_width] = resized
    return square, box


def _write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file. No fsync:
    the page cache outlives a killed process, which is the interruption resumed from."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def decode_checked(data: bytes, name: str, size: int, quality: QualityConfig
                   ) -> tuple[DicomImage | None, str, str]:
    """Decode one file and pass it through the quality gate.

    Returns the image (None when the gate skips it), the skip reason and the gate's flags;
    raises ``InputQualityError`` for a check whose policy is ``error``, and ``DicomError``
    for a file that does not decode.
    """
    try:
        image = decode(data, name, target_size=size)
    except ColourImageError as exc:
        result = colour_result(exc, quality, name)
        return None, result.skip_reason, result.flag_text
    result = quality_check(image, quality, name)
    return (None if result.skip_reason else image), result.skip_reason, result.flag_text


def _decode_rows(folder: DicomFolder, rows: list[tuple[int, str]], images_path: str,
                 config: CacheConfig) -> list[dict]:
    """Worker: decode ``rows`` into the memory map at ``images_path``; return their metadata."""
    images = np.load(images_path, mmap_mode="r+")
    results = []
    for row, patient_id in rows:
        record: dict = {"patientId": patient_id, "row": row, "status": "ok", "reason": "",
                        "flags": "", "view_position": ""}
        name = folder.display_name(patient_id)
        try:
            if patient_id not in folder:
                raise DicomError(f"{name}: file not found")
            image, skip_reason, flags = decode_checked(
                folder.read_bytes(patient_id), name, config.image_size, config.quality)
            record["flags"] = flags
            if image is None:
                images[row] = 0
                record.update(status="skipped", reason=skip_reason)
            else:
                square, box = preprocess(image, config.image_size)
                images[row] = square
                record.update(view_position=image.view_position, **box.as_dict())
        except InputQualityError:
            raise  # policy error: stops whatever on_error says
        except DicomError as exc:
            if config.on_error == "error":
                raise
            images[row] = 0
            record.update(status="skipped", reason=str(exc))
        results.append(record)
    # No msync: written pages live in the page cache, which survives the process being
    # killed (the resume case) and reaches the disk by the kernel's writeback. Only a power
    # loss during a build could lose rows already marked done: delete the cache after one.
    del images
    return results


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class ImageCache:
    """A built cache: ``images`` (memory-mapped, read-only) and ``index``; picklable by path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._images: np.ndarray | None = None
        self._index: pd.DataFrame | None = None

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
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
        return {"path": self.path}

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
        fingerprint in (None, content.get("fingerprint"))


def _finished_records(path: Path) -> list[dict]:
    """Every finished chunk's records, in row order."""
    records = []
    for chunk_file in sorted((path / "records").glob("*.json")):
        records.extend(json.loads(chunk_file.read_text()))
    return sorted(records, key=lambda record: record["row"])


def build(cache_plan: CachePlan, path: str | Path) -> dict:
    """Build or resume the cache at ``path``; returns build statistics (rows decoded, etc.)."""
    path = Path(path)
    config = cache_plan.config
    fingerprint = cache_plan.fingerprint()
    n = len(cache_plan.patient_ids)
    if is_complete(path, fingerprint):
        logger.info("image cache %s is up to date (%d images); nothing to decode", path, n)
        return {"decoded": 0, "reused": n}

    manifest_path = path / "manifest.json"
    same_build = manifest_path.is_file() and \
        json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint
    if not same_build:
        if path.exists():
            logger.info("image cache %s was built from other sources or settings; rebuilding",
                        path)
            shutil.rmtree(path)
        path.mkdir(parents=True)
        shape = (n, config.image_size, config.image_size)
        partial = path / "images.partial.npy"
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape).flush()
        os.replace(partial, path / "images.npy")
        (path / "records").mkdir()
        _write_atomic(manifest_path, json.dumps({
            "fingerprint": fingerprint, "image_size": config.image_size,
            "preprocessing_version": PREPROCESSING_VERSION, "images": n, "complete": False,
        }, indent=2).encode())

    done = {record["row"] for record in _finished_records(path)}
    todo = [(row, pid) for row, pid in enumerate(cache_plan.patient_ids) if row not in done]
    logger.info("image cache %s: %d of %d images to decode", path, len(todo), n)
    images_path = str(path / "images.npy")

    def finish(results: list[dict]) -> None:
        # Named by the chunk's first row, which no earlier record holds (it was not done).
        first = results[0]["row"]
        _write_atomic(path / "records" / f"{first:08d}.json", json.dumps(results).encode())

    chunks = list(_chunks(todo, config.chunk_size))
    with tqdm(total=len(todo), desc=f"caching {path.name}", unit="image",
              disable=not config.progress) as bar:
        if config.workers <= 0 or len(chunks) <= 1:
            for chunk in chunks:
                results = _decode_rows(cache_plan.folder, chunk, images_path, config)
                finish(results)
                bar.update(len(results))
        else:
            with ProcessPoolExecutor(max_workers=config.workers,
                                     mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_decode_rows, cache_plan.folder, chunk, images_path,
                                       config) for chunk in chunks]
                try:
                    for future in as_completed(futures):
                        try:
                            results = future.result()
                        except DicomError as exc:
                            # The worker's traceback would only bury the file's name.
                            raise type(exc)(str(exc)) from None
                        finish(results)
                        bar.update(len(results))
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise

    index = pd.DataFrame(_finished_records(path)).reindex(columns=list(INDEX_COLUMNS))
    index = index.reset_index(drop=True)
    index.to_parquet(path / "index.partial.parquet", index=False)
    os.replace(path / "index.partial.parquet", path / "index.parquet")
    manifest = json.loads(manifest_path.read_text())
    manifest["complete"] = True
    _write_atomic(manifest_path, json.dumps(manifest, indent=2).encode())
    return {"decoded": len(todo), "reused": n - len(todo)}
