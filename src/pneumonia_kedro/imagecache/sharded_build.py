"""Building a sharded cache (``cache.shard_size``): the image list split into parts of
``shard_size`` images, one ordinary cache folder per part (``shards``).

Each part is built, and resumed, as an unsharded cache of its images is: its own
fingerprint (so a part is reused only when its images and settings are unchanged), records
per finished chunk. The decoding is the unsharded build's (worker processes or Ray tasks),
over chunks that never cross a part, in the order they finish: the parts' work overlaps, and
a part is finished (its index, its manifest marked complete) as soon as its last chunk is
written. The cache folder's own index (global rows) and manifest come last.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from pneumonia_kedro.imagecache.decoding import (
    CachePlan,
    _chunks,
    decoded_chunks,
    figures,
    index_table,
)
from pneumonia_kedro.imagecache.files import PREPROCESSING_VERSION, CacheChunk, CacheState
from pneumonia_kedro.imagecache.shards import part_bounds

if TYPE_CHECKING:
    from pneumonia_kedro.engines import EngineConfig

logger = logging.getLogger(__name__)


@dataclass
class _Part:
    """One part's work: rows ``first`` .. ``stop - 1``; records (part rows) already done."""

    number: int
    first: int
    stop: int
    fingerprint: str
    records: list[dict] = field(default_factory=list)
    todo: list[tuple[int, str]] = field(default_factory=list)  # global rows
    complete: bool = False
    skipped: int = 0


def _start(fingerprint: str, cache_plan: CachePlan, images: int, **extra: int) -> dict:
    return {"fingerprint": fingerprint, "image_size": cache_plan.config.image_size,
            "preprocessing_version": PREPROCESSING_VERSION, "images": images,
            **extra, "complete": False}


def _part_plan(cache_plan: CachePlan, first: int, stop: int) -> CachePlan:
    """The plan of one part: an unsharded cache of its images."""
    return CachePlan(folder=cache_plan.folder, patient_ids=cache_plan.patient_ids[first:stop],
                     config=dataclasses.replace(cache_plan.config, shard_size=None),
                     sources=cache_plan.sources[first:stop])


def _parts(cache_plan: CachePlan, state: CacheState, started_anew: bool
           ) -> Iterator[CacheChunk | _Part]:
    """Each part's work, after the chunk that starts it when it is new or was built from
    other images or settings."""
    shard_size = cache_plan.config.shard_size
    for number, (first, stop) in enumerate(part_bounds(len(cache_plan.patient_ids),
                                                       shard_size)):
        fingerprint = _part_plan(cache_plan, first, stop).fingerprint()
        found = None if started_anew else state.parts.get(number)
        part = _Part(number, first, stop, fingerprint)
        if found is not None and found.fingerprint == fingerprint:
            part.records, part.complete = list(found.records), found.complete
        else:
            yield CacheChunk(part=number, start=_start(fingerprint, cache_plan, stop - first,
                                                       first_row=first))
        done = {record["row"] for record in part.records}
        part.todo = [(first + row, cache_plan.patient_ids[first + row])
                     for row in range(stop - first) if row not in done]
        yield part


def _in_part(chunk: CacheChunk, part: _Part) -> CacheChunk:
    """A decoded chunk (global rows) as its part folder holds it (rows from 0)."""
    return CacheChunk(part=part.number, rows=[row - part.first for row in chunk.rows],
                      images=chunk.images,
                      records=[{**record, "row": record["row"] - part.first}
                               for record in chunk.records])


def _finish(part: _Part, workers: int, started: float) -> CacheChunk:
    return CacheChunk(part=part.number, index=index_table(part.records),
                      build=figures(part.stop - part.first, len(part.todo), part.skipped,
                                    workers, started))


def decode_parts(cache_plan: CachePlan, state: CacheState, engine: EngineConfig | None = None
                 ) -> Iterator[CacheChunk]:
    """``decoding.decode_chunks`` for a sharded cache (``cache_plan.config.shard_size``):
    the chunks that start, fill and finish each part that is not complete, then the cache's
    index and figures. A cache built with another shard_size, or as one folder, is rebuilt."""
    started = time.perf_counter()
    config, fingerprint = cache_plan.config, cache_plan.fingerprint()
    n = len(cache_plan.patient_ids)
    started_anew = state.fingerprint != fingerprint
    if started_anew:
        if state.fingerprint is not None and state.shard_size != config.shard_size:
            logger.warning("image cache %s was built %s; rebuilding it in parts of %d images "
                           "(cache.shard_size): every image is decoded again", state.path,
                           "as one folder" if state.shard_size is None else
                           f"in parts of {state.shard_size} images", config.shard_size)
        elif state.fingerprint is not None:
            logger.info("image cache %s was built from other sources or settings; rebuilding",
                        state.path)
        yield CacheChunk(start=_start(fingerprint, cache_plan, n, shard_size=config.shard_size,
                                      parts=len(part_bounds(n, config.shard_size))))
    parts = []
    for item in _parts(cache_plan, state, started_anew):
        if isinstance(item, CacheChunk):
            yield item
        else:
            parts.append(item)
    for part in parts:
        if not part.todo and not part.complete:  # killed between its last chunk and index
            yield _finish(part, config.workers, started)
    todo = [rows for part in parts for rows in _chunks(part.todo, config.chunk_size)]
    left = {part.number: len(part.todo) for part in parts}
    logger.info("image cache %s: %d of %d images to decode in %d of %d parts", state.path,
                sum(left.values()), n, sum(count > 0 for count in left.values()), len(parts))
    with tqdm(total=sum(left.values()), desc=f"caching {state.path.name}", unit="image",
              disable=not config.progress) as bar:
        for chunk in decoded_chunks(cache_plan, todo, engine):
            part = parts[chunk.rows[0] // config.shard_size]
            written = _in_part(chunk, part)
            part.records.extend(written.records)
            part.skipped += sum(record["status"] != "ok" for record in written.records)
            yield written
            bar.update(len(written.records))
            left[part.number] -= len(written.records)
            if left[part.number] == 0:
                yield _finish(part, config.workers, started)
    records = [{**record, "row": record["row"] + part.first}
               for part in parts for record in part.records]
    decoded = sum(len(part.todo) for part in parts)
    yield CacheChunk(index=index_table(records),
                     build=figures(n, decoded, sum(part.skipped for part in parts),
                                   config.workers, started))
