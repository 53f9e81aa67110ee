"""Nodes of the cache pipeline."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pandas as pd

from pneumonia_kedro.config import from_params
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.imagecache import (
    CacheChunk,
    CacheConfig,
    CachePlan,
    CacheState,
    ImageCache,
    decode_chunks,
    plan,
    quality_summary,
)
from pneumonia_kedro.pipelines.ingest.nodes import IngestConfig
from pneumonia_kedro.reporting import capped


def plan_cache(patients: pd.DataFrame, dicoms: DicomFolder, params: dict, ingest_params: dict
               ) -> CachePlan:
    """What the split's cache must hold, gated by ``ingest.quality``."""
    quality = from_params(IngestConfig, ingest_params, "ingest").quality
    config = dataclasses.replace(from_params(CacheConfig, params, "cache"), quality=quality)
    return plan(dicoms, patients["patientId"].tolist(), config)


def cache_images(patients: pd.DataFrame, dicoms: DicomFolder, params: dict,
                 ingest_params: dict, finished: CacheState) -> Iterator[CacheChunk]:
    """Decode the split's DICOMs (in worker processes) that the cache ``finished`` describes
    does not hold yet, a chunk at a time; Kedro saves each chunk as it comes, so a killed
    build resumes after its last saved chunk."""
    yield from decode_chunks(plan_cache(patients, dicoms, params, ingest_params), finished)


def report_cache(train_image_cache: ImageCache, validation_image_cache: ImageCache) -> dict:
    """Images cached per split, every skipped file with its reason, the quality flags, and
    the last build's figures (images decoded and reused, seconds, images per second)."""
    report: dict = {"image_size": train_image_cache.image_size}
    for name, cache in (("train", train_image_cache), ("validation", validation_image_cache)):
        index = cache.index
        skipped = index.loc[index["status"] != "ok"]
        report[name] = {
            "images": int((index["status"] == "ok").sum()),
            "skipped": capped(dict(zip(skipped["patientId"], skipped["reason"], strict=True))),
            "quality_flags": quality_summary(index),
            "build": cache.manifest.get("build", {}),
        }
    return report
