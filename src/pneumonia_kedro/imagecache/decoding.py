"""Building the image cache: what it must hold (``plan``), how one file becomes a cached
image (``preprocess``, ``decode_checked``), and the build itself (``decode_chunks``: decode in
worker processes what the cache lacks, a chunk at a time)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Literal

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
from pneumonia_kedro.imagecache.files import (
    INDEX_COLUMNS,
    PREPROCESSING_VERSION,
    CacheChunk,
    CacheState,
    read_state,
    write_chunk,
)
from pneumonia_kedro.imagecache.shards import cache_path

if TYPE_CHECKING:
    from pneumonia_kedro.engines import EngineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheConfig:
    """How images are cached: square size, worker processes, what to do with files that do
    not decode (``on_error``) and with files the input quality gate flags (``quality``);
    ``shard_size``: images per part folder of a sharded cache (None: one folder)."""

    RANGES = {"image_size": Range(16), "workers": NON_NEGATIVE, "chunk_size": AT_LEAST_ONE,
              "shard_size": AT_LEAST_ONE}

    image_size: int = 512
    workers: int = 2
    chunk_size: int = 32
    on_error: Literal["error", "skip"] = "error"
    progress: bool = True
    shard_size: int | None = None
    # The input quality gate: the pipelines set it from params:quality; None (scripts and
    # tests of the cache itself) checks nothing.
    quality: QualityConfig | None = None


@dataclass
class CachePlan:
    """What a cache must hold: these patients' files from this folder, preprocessed so."""

    folder: DicomFolder
    patient_ids: list[str]
    config: CacheConfig
    sources: list[tuple[str, int, float]] = field(default_factory=list)

    def fingerprint(self) -> str:
        # shard_size only when set: an unsharded cache keeps the fingerprint it always had.
        sharding = {} if self.config.shard_size is None else \
            {"shard_size": self.config.shard_size}
        payload = json.dumps({**sharding,
            "version": PREPROCESSING_VERSION,
            "image_size": self.config.image_size,
            # What is refused or skipped changes what the cache holds.
            "on_error": self.config.on_error,
            "quality": self.config.quality.as_dict() if self.config.quality else None,
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


def decode_checked(data: bytes, name: str, size: int, quality: QualityConfig | None
                   ) -> tuple[DicomImage | None, str, str]:
    """Decode one file and pass it through the quality gate (``None``: no gate).

    Returns the image (None when the gate skips it), the skip reason and the gate's flags;
    raises ``InputQualityError`` for a check whose policy is ``error``, and ``DicomError``
    for a file that does not decode.
    """
    try:
        image = decode(data, name, target_size=size)
    except ColourImageError as exc:
        if quality is None:
            raise
        result = colour_result(exc, quality, name)
        return None, result.skip_reason, result.flag_text
    if quality is None:
        return image, "", ""
    result = quality_check(image, quality, name)
    return (None if result.skip_reason else image), result.skip_reason, result.flag_text


def _decode_rows(folder: DicomFolder, rows: list[tuple[int, str]], config: CacheConfig
                 ) -> CacheChunk:
    """Worker: decode ``rows`` into one array (skipped files stay black) with their records."""
    images = np.zeros((len(rows), config.image_size, config.image_size), dtype=np.uint8)
    records = []
    for position, (row, patient_id) in enumerate(rows):
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
                record.update(status="skipped", reason=skip_reason)
            else:
                images[position], box = preprocess(image, config.image_size)
                record.update(view_position=image.view_position, **box.as_dict())
        except InputQualityError:
            raise  # policy error: stops whatever on_error says
        except DicomError as exc:
            if config.on_error == "error":
                raise
            record.update(status="skipped", reason=str(exc))
        records.append(record)
    return CacheChunk(rows=[row for row, _ in rows], images=images, records=records)


def _decoded_in_workers(cache_plan: CachePlan, chunks: list[list[tuple[int, str]]]
                        ) -> Iterator[CacheChunk]:
    """Chunks decoded by ``config.workers`` processes, in the order they finish. A few chunks
    are in flight at a time, so memory holds a few chunks' pixels, not the whole cache."""
    config = cache_plan.config
    waiting = iter(chunks)
    with ProcessPoolExecutor(max_workers=config.workers,
                             mp_context=get_context("spawn")) as pool:
        running = {pool.submit(_decode_rows, cache_plan.folder, chunk, config)
                   for chunk in islice(waiting, 2 * config.workers)}
        try:
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        chunk = future.result()
                    except DicomError as exc:
                        # The worker's traceback would only bury the file's name.
                        raise type(exc)(str(exc)) from None
                    running |= {pool.submit(_decode_rows, cache_plan.folder, rows, config)
                                for rows in islice(waiting, 1)}
                    yield chunk
        except BaseException:
            for future in running:
                future.cancel()
            raise


def decode_chunks(cache_plan: CachePlan, state: CacheState,
                  engine: EngineConfig | None = None) -> Iterator[CacheChunk]:
    """The work of building the cache ``state`` describes: a new cache when it was built from
    other sources or settings, then every row not yet done, a chunk at a time, then the index
    and the build's figures. Each chunk is written before the next is made, so a kill loses
    one chunk. An up-to-date cache gets one empty chunk (Kedro saves at least one): it is left
    untouched, its manifest keeping the figures of the build that made it. ``engine``: where
    the chunks are decoded (``ray``: tasks on a Ray cluster; default: ``config.workers``
    processes here). With ``config.shard_size`` the cache is built in parts
    (``sharded_build``)."""
    started = time.perf_counter()
    config, fingerprint = cache_plan.config, cache_plan.fingerprint()
    n = len(cache_plan.patient_ids)
    if state.complete and state.fingerprint == fingerprint:
        logger.info("image cache %s is up to date (%d images); nothing to decode", state.path, n)
        yield CacheChunk()
        return
    if config.shard_size is not None:
        # Imported here: sharded_build builds on this module.
        from pneumonia_kedro.imagecache.sharded_build import decode_parts

        yield from decode_parts(cache_plan, state, engine)
        return
    finished = state.records if state.fingerprint == fingerprint else []
    if state.fingerprint != fingerprint:
        if state.shard_size is not None:
            logger.warning("image cache %s was built in parts of %d images; rebuilding it as "
                           "one folder (cache.shard_size is null): every image is decoded "
                           "again", state.path, state.shard_size)
        elif state.fingerprint is not None:
            logger.info("image cache %s was built from other sources or settings; rebuilding",
                        state.path)
        yield CacheChunk(start={
            "fingerprint": fingerprint, "image_size": config.image_size,
            "preprocessing_version": PREPROCESSING_VERSION, "images": n, "complete": False})
    done = {record["row"] for record in finished}
    todo = [(row, pid) for row, pid in enumerate(cache_plan.patient_ids) if row not in done]
    logger.info("image cache %s: %d of %d images to decode", state.path, len(todo), n)
    decoded = decoded_chunks(cache_plan, list(_chunks(todo, config.chunk_size)), engine)
    records, skipped = list(finished), 0
    with tqdm(total=len(todo), desc=f"caching {state.path.name}", unit="image",
              disable=not config.progress) as bar:
        for chunk in decoded:
            records.extend(chunk.records)
            skipped += sum(record["status"] != "ok" for record in chunk.records)
            yield chunk
            bar.update(len(chunk.records))
    yield CacheChunk(index=index_table(records),
                     build=figures(n, len(todo), skipped, config.workers, started))


def decoded_chunks(cache_plan: CachePlan, chunks: list[list[tuple[int, str]]],
                   engine: EngineConfig | None) -> Iterator[CacheChunk]:
    """``chunks`` decoded where ``engine`` says, in the order they finish."""
    config = cache_plan.config
    if engine is not None and engine.is_ray:
        # Imported only here: the local engine imports no Ray.
        from pneumonia_kedro.engines.ray_engine import decoded_on_ray

        return decoded_on_ray(cache_plan, chunks, engine)
    if config.workers <= 0 or len(chunks) <= 1:
        return (_decode_rows(cache_plan.folder, rows, config) for rows in chunks)
    return _decoded_in_workers(cache_plan, chunks)


def index_table(records: list[dict]) -> pd.DataFrame:
    """The cache's index: one row per record, in row order, with the index's columns."""
    index = pd.DataFrame(sorted(records, key=lambda record: record["row"]))
    return index.reindex(columns=list(INDEX_COLUMNS)).reset_index(drop=True)


def figures(images: int, decoded: int, skipped: int, workers: int, started: float) -> dict:
    """A build's figures, as its manifest keeps them."""
    seconds = time.perf_counter() - started
    return {"images": images, "decoded": decoded, "reused": images - decoded,
            "skipped": skipped, "workers": workers, "seconds": round(seconds, 3),
            "images_per_second": round(decoded / seconds, 1) if decoded else None}


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build(cache_plan: CachePlan, path: str | Path, engine: EngineConfig | None = None) -> dict:
    """Build or resume the cache at ``path`` outside a Kedro run (scripts, tests): what the
    cache node and its dataset do. Returns the figures of the build that made the cache."""
    for chunk in decode_chunks(cache_plan, read_state(path), engine):
        write_chunk(path, chunk)
    return json.loads((cache_path(path) / "manifest.json").read_text())["build"]
