"""Nodes of the cache pipeline."""

from __future__ import annotations

import pandas as pd

from pneumonia_kedro.config import from_params
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.imagecache import CacheConfig, CachePlan, ImageCache, plan


def plan_cache(patients: pd.DataFrame, dicoms: DicomFolder, params: dict) -> CachePlan:
    """What the split's cache must hold; its dataset builds or resumes it on save."""
    return plan(dicoms, patients["patientId"].tolist(), from_params(CacheConfig, params, "cache"))


def report_cache(train_image_cache: ImageCache, validation_image_cache: ImageCache) -> dict:
    """Images cached per split and every skipped file with its reason."""
    report: dict = {"image_size": train_image_cache.image_size}
    for name, cache in (("train", train_image_cache), ("validation", validation_image_cache)):
        index = cache.index
        skipped = index.loc[index["status"] != "ok"]
        report[name] = {
            "images": int((index["status"] == "ok").sum()),
            "skipped": dict(zip(skipped["patientId"], skipped["reason"], strict=True)),
        }
    return report
