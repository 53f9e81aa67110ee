"""Nodes of the inference pipeline."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pneumonia_kedro.config import AT_LEAST_ONE, ConfigError, from_params
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.dicom.quality import INFERENCE_QUALITY, QualityConfig
from pneumonia_kedro.ensemble import Ensemble
from pneumonia_kedro.figures import overlay_figure
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
from pneumonia_kedro.inference import cached_squares
from pneumonia_kedro.prediction import predict, prediction_settings
from pneumonia_kedro.reporting import capped
from pneumonia_kedro.structured_report import boxes_and_scores, report_bytes
from pneumonia_kedro.submission import build_submission, check_against_sample
from pneumonia_kedro.training import resolve_device

logger = logging.getLogger(__name__)
SR_CHUNK = 256  # structured reports per saved chunk


@dataclass(frozen=True)
class InferenceConfig:
    """How a folder of DICOMs becomes predictions and a submission."""

    RANGES = {"batch_size": AT_LEAST_ONE}

    cache: CacheConfig = field(default_factory=lambda: CacheConfig(on_error="skip"))
    quality: QualityConfig = INFERENCE_QUALITY
    dicom_sr: bool = False
    batch_size: int = 16
    device: str = "auto"
    no_box: Literal["empty", "whole_image"] = "empty"
    model_uri: str | None = None  # an MLflow model (e.g. models:/m-...) instead of the catalog's
    models: str = "ensemble"  # ensemble: every fold's model, fused | fold_2: that fold's alone
    overlay_patients: tuple = ()
    progress: bool = True


def _config(params: dict) -> InferenceConfig:
    return from_params(InferenceConfig, params, "inference")


def _chosen_models(ensemble: Ensemble, postprocessing: dict, config: InferenceConfig
                   ) -> tuple[Ensemble, dict]:
    """The catalog's models (the latest versions, or --load-versions; ``inference.models``
    picks one fold's) unless an MLflow model URI is given; an MLflow model brings its
    classifiers and the post-processing it was logged with."""
    if not config.model_uri:
        return ensemble.select(config.models), postprocessing
    from pneumonia_kedro.datasets.mlflow_detector import load_logged_detector

    logged, settings = load_logged_detector(config.model_uri)
    logger.info("inference uses the MLflow model %s", config.model_uri)
    return logged.select(config.models), settings["postprocess"]


def plan_test_cache(test_dicoms: DicomFolder, ensemble: Ensemble, params: dict) -> CachePlan:
    """Every file of the folder, converted exactly as the training images were."""
    config = _config(params)
    chosen, _ = _chosen_models(ensemble, {}, config)
    asked = params.get("cache", {}).get("image_size")
    if asked is not None and asked != chosen.image_size:
        raise ConfigError(
            f"params:inference.cache.image_size = {asked} differs from the model's "
            f"{chosen.image_size} px: test images are cached at the size the model was "
            "trained on; leave inference.cache.image_size out")
    cache_config = CacheConfig(**{**config.cache.__dict__, "image_size": chosen.image_size,
                                  "quality": config.quality})
    return plan(test_dicoms, test_dicoms.patient_ids, cache_config)


def cache_test_images(test_dicoms: DicomFolder, ensemble: Ensemble, params: dict,
                      finished: CacheState) -> Iterator[CacheChunk]:
    """Decode the folder's files that the cache ``finished`` describes does not hold yet, a
    chunk at a time (each saved as it comes, so a killed build resumes)."""
    yield from decode_chunks(plan_test_cache(test_dicoms, ensemble, params), finished)


def predict_test(ensemble: Ensemble, test_image_cache: ImageCache, postprocessing: dict,
                 params: dict) -> pd.DataFrame:
    """Post-processed boxes per test image with its image-level probabilities and view."""
    config = _config(params)
    chosen, postprocessing = _chosen_models(ensemble, postprocessing, config)
    # The TTA the post-processing was tuned with: they belong together.
    tta, values = prediction_settings(postprocessing)
    prediction = predict(chosen.build(resolve_device(config.device)),
                         cached_squares(test_image_cache), tta, values, config.batch_size,
                         config.progress, desc="test")
    final, classifier_p = prediction.boxes, prediction.classifier_probability
    views = test_image_cache.usable.set_index("patientId")["view_position"]
    final["image_probability"] = final["patientId"].map(prediction.image_probability)
    final["classifier_probability"] = final["patientId"].map(classifier_p) \
        if classifier_p is not None else np.nan
    final["view_position"] = final["patientId"].map(views)
    return final


def write_submission(test_predictions: pd.DataFrame, test_image_cache: ImageCache,
                     test_dicoms: DicomFolder, sample_submission: pd.DataFrame, params: dict
                     ) -> tuple[pd.DataFrame, dict]:
    """The Kaggle submission (one row per input file, sorted) and the inference report."""
    config = _config(params)
    index = test_image_cache.index
    patient_ids = sorted(index["patientId"])
    sizes = {r["patientId"]: (int(r["height"]), int(r["width"]))
             for r in index.loc[index["status"] == "ok"].to_dict("records")}
    submission = build_submission(test_predictions, patient_ids, config.no_box, sizes)
    skipped = index.loc[index["status"] != "ok"]
    report = {
        "files": len(index) + len(test_dicoms.rejected),
        "predicted": int((index["status"] == "ok").sum()),
        "with_boxes": int(test_predictions["patientId"].nunique()),
        "boxes": len(test_predictions),
        "skipped": capped(dict(zip(skipped["patientId"], skipped["reason"], strict=True))),
        "rejected_files": capped(test_dicoms.rejected),
        "quality_flags": quality_summary(index),
        "no_box_convention": config.no_box,
        **check_against_sample(submission, sample_submission),
    }
    if len(skipped):
        logger.warning("%d file(s) could not be decoded; listed in the inference report and "
                       "written with an empty PredictionString", len(skipped))
    return submission, report


def write_structured_reports(test_predictions: pd.DataFrame, test_image_cache: ImageCache,
                             test_dicoms: DicomFolder, ensemble: Ensemble,
                             params: dict) -> Iterator[dict[str, bytes]]:
    """With ``inference.dicom_sr``, one DICOM SR per predicted image (boxes in the source's
    pixels), yielded in chunks that Kedro saves as they come; one empty chunk otherwise (the
    dataset then holds no SR from an earlier run)."""
    config = _config(params)
    patient_ids = test_image_cache.usable["patientId"].tolist() if config.dicom_sr else []
    if not patient_ids:
        yield {}
        return
    version = _chosen_models(ensemble, {}, config)[0].version
    by_patient = {pid: rows for pid, rows in test_predictions.groupby("patientId", sort=False)}

    def report(patient_id: str) -> bytes:
        rows = by_patient.get(patient_id)
        boxes, scores = boxes_and_scores(rows)
        # Images without boxes carry no probability in test_predictions.
        probability = None if rows is None else float(rows["image_probability"].iloc[0])
        return report_bytes(test_dicoms.read_bytes(patient_id),
                            test_dicoms.display_name(patient_id), boxes, scores, probability,
                            version)

    # Large chunks: the MLflow artifact wrapper uploads the whole folder after each save.
    for start in range(0, len(patient_ids), SR_CHUNK):
        yield {pid: report(pid) for pid in patient_ids[start:start + SR_CHUNK]}


def draw_overlays(test_predictions: pd.DataFrame, test_image_cache: ImageCache,
                  params: dict) -> dict[str, plt.Figure]:
    """One PNG per requested patient: the cached image with its predicted boxes."""
    config = _config(params)
    usable = set(test_image_cache.usable["patientId"])
    figures = {}
    for patient_id in config.overlay_patients:
        if patient_id not in usable:
            logger.warning("overlay_patients: %s is not among the predicted images", patient_id)
            continue
        rows = test_predictions.loc[test_predictions["patientId"] == patient_id]
        figures[f"{patient_id}.png"] = overlay_figure(test_image_cache, patient_id,
                                                      predicted=rows)
    return figures
