"""The image cache: every DICOM decoded once into one memory-mapped uint8 array per split.

Layout of a cache folder::

    manifest.json   what it was built from (fingerprint), whether it is complete, and the last
                    build's figures (images decoded, reused, skipped, seconds)
    images.npy      uint8 array (N, size, size), opened memory-mapped
    records/        one JSON file per finished chunk: its rows' metadata; the only record of
                    what is done (a kill between two files cannot make them disagree)
    index.parquet   one row per patient: row, status, reason, original size, letterbox

Building is incremental: ``decode_chunks`` (the cache node's work) compares the plan with the
cache's ``CacheState``, decodes only rows not yet done, in worker processes, and yields them as
``CacheChunk``s; ``write_chunk`` (what the cache's dataset does with each) puts them on disk.
A cache whose fingerprint (sources, image size, preprocessing version) matches is reused, so a
killed build resumes and ends identical to an uninterrupted one.

With ``cache.shard_size`` the cache is sharded for an archive larger than one disk (or one
file) should hold: one such folder per part of ``shard_size`` images under the cache folder,
each built and resumed as above, read as one array by global row (``shards``,
``sharded_build``). The folder is memory-mapped: a path (or ``file://`` URL) on a mounted
file system, never another fsspec URL (``cache_path``).
"""

from pneumonia_kedro.imagecache.decoding import (
    CacheConfig,
    CachePlan,
    build,
    decode_checked,
    decode_chunks,
    plan,
    preprocess,
)
from pneumonia_kedro.imagecache.files import (
    INDEX_COLUMNS,
    PREPROCESSING_VERSION,
    CacheChunk,
    CacheState,
    ImageCache,
    is_complete,
    quality_summary,
    read_state,
    write_chunk,
)
from pneumonia_kedro.imagecache.shards import CacheLocationError, ShardedImages, cache_path

__all__ = ["INDEX_COLUMNS", "PREPROCESSING_VERSION", "CacheChunk", "CacheConfig",
           "CacheLocationError", "CachePlan", "CacheState", "ImageCache", "ShardedImages",
           "build", "cache_path", "decode_checked", "decode_chunks", "is_complete", "plan",
           "preprocess", "quality_summary", "read_state", "write_chunk"]
