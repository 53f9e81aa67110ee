"""Nodes of the cache pipeline."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd

from pneumonia_kedro.config import from_params
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.dicom.appearance import calibrate, features
from pneumonia_kedro.dicom.quality_settings import quality_settings, training_gate
from pneumonia_kedro.engines import engine_config
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
from pneumonia_kedro.reporting import capped

logger = logging.getLogger(__name__)


def plan_cache(patients: pd.DataFrame, dicoms: DicomFolder, params: dict, quality_params: dict
               ) -> CachePlan:
    """What the split's cache must hold, gated by the training policies of ``quality``."""
    config = dataclasses.replace(from_params(CacheConfig, params, "cache"),
                                 quality=training_gate(quality_params))
    return plan(dicoms, patients["patientId"].tolist(), config)


def cache_images(patients: pd.DataFrame, dicoms: DicomFolder, params: dict,
                 quality_params: dict, finished: CacheState, engine: dict | str | None = None
                 ) -> Iterator[CacheChunk]:
    """Decode the split's DICOMs (in worker processes, or Ray tasks with ``engine: ray``)
    that the cache ``finished`` describes does not hold yet, a chunk at a time; Kedro saves
    each chunk as it comes, so a killed build resumes after its last saved chunk."""
    yield from decode_chunks(plan_cache(patients, dicoms, params, quality_params), finished,
                             engine_config(engine))


def calibrate_appearance(train_image_cache: ImageCache, quality_params: dict) -> dict:
    """The quality gate's appearance reference, from the training images as cached (each
    without its letterbox padding), and the training images beyond its threshold."""
    settings = quality_settings(quality_params).appearance
    images, usable = train_image_cache.images, train_image_cache.usable
    vectors = []
    for record in usable.to_dict("records"):
        box = train_image_cache.letterbox_from_record(record)
        vectors.append(features(images[record["row"]][
            box.offset_y:box.offset_y + box.resized_height,
            box.offset_x:box.offset_x + box.resized_width]))
    try:
        reference, held_out = calibrate(np.array(vectors), settings.components,
                                        settings.quantile, settings.margin)
    except ValueError as exc:
        logger.warning("quality gate: no appearance reference (%s); inference will not "
                       "check how far images lie from the training images", exc)
        return {"reference": None, "reason": str(exc), "training_images": len(vectors)}
    beyond = {pid: round(float(d), 3) for pid, d in
              zip(usable["patientId"], held_out, strict=True) if d > reference.threshold}
    if beyond:
        logger.warning("quality gate: %d training image(s) lie beyond the appearance "
                       "threshold %.2f (listed in appearance_reference.json)", len(beyond),
                       reference.threshold)
    return {"reference": reference.as_dict(), "reason": "", "training_images": len(vectors),
            "held_out_distance_quantiles": {
                str(q): round(float(np.quantile(held_out, q)), 4) for q in (0.5, 0.9, 0.99)},
            "beyond_threshold": capped(beyond)}


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
