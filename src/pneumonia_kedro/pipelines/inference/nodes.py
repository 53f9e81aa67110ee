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
from pneumonia_kedro.dicom.folder import FolderChunk, folder_chunks
from pneumonia_kedro.dicom.quality_settings import inference_gate
from pneumonia_kedro.engines import engine_config
from pneumonia_kedro.ensemble import Ensemble, differences, tag_active_run
from pneumonia_kedro.errors import DicomError
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
SR_CHUNK = 256  # structured reports held in memory before the dataset writes them


@dataclass(frozen=True)
class InferenceConfig:
    """How a folder of DICOMs becomes predictions and a submission."""

    RANGES = {"batch_size": AT_LEAST_ONE}

    cache: CacheConfig = field(default_factory=lambda: CacheConfig(on_error="skip"))
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


def _refuse_other_models(models: dict, postprocessing: dict) -> None:
    """Post-processing tuned for other models (retrained since, ``--load-versions``, another
    fold count) would be applied in silence: refuse it, saying what to run."""
    found = differences(models, postprocessing.get("models"))
    if found:
        raise ConfigError(
            f"postprocessing.json was not tuned for the models inference would use "
            f"({models['version']}): {'; '.join(found)}. Tune it for them with `kedro run "
            "--pipelines evaluate` (with FOLDS > 1: `--pipelines cross_validation`), or load "
            "the models it was tuned for with `kedro run --pipelines inference --load-versions "
            "trained_model:<version>,trained_classifier:<version>` (versions: the folders under "
            "data/06_models/), or use the MLflow model with inference.model_uri")


def plan_test_cache(test_dicoms: DicomFolder, ensemble: Ensemble, params: dict,
                    quality_params: dict, appearance_reference: dict | None) -> CachePlan:
    """Every file of the folder, converted exactly as the training images were, through the
    inference policies of ``quality`` (with the training images' appearance reference)."""
    config = _config(params)
    chosen, _ = _chosen_models(ensemble, {}, config)
    asked = params.get("cache", {}).get("image_size")
    if asked is not None and asked != chosen.image_size:
        raise ConfigError(
            f"params:inference.cache.image_size = {asked} differs from the model's "
            f"{chosen.image_size} px: test images are cached at the size the model was "
            "trained on; leave inference.cache.image_size out")
    cache_config = CacheConfig(**{**config.cache.__dict__, "image_size": chosen.image_size,
                                  "quality": inference_gate(quality_params,
                                                            appearance_reference)})
    return plan(test_dicoms, test_dicoms.patient_ids, cache_config)


def cache_test_images(test_dicoms: DicomFolder, ensemble: Ensemble, params: dict,
                      quality_params: dict, appearance_reference: dict | None,
                      finished: CacheState, engine: dict | str | None = None
                      ) -> Iterator[CacheChunk]:
    """Decode the folder's files that the cache ``finished`` describes does not hold yet, a
    chunk at a time (each saved as it comes, so a killed build resumes); with ``engine: ray``
    in tasks across the cluster."""
    yield from decode_chunks(plan_test_cache(test_dicoms, ensemble, params, quality_params,
                                             appearance_reference), finished,
                             engine_config(engine))


def predict_test(ensemble: Ensemble, test_image_cache: ImageCache, postprocessing: dict,
                 params: dict, engine: dict | str | None = None) -> pd.DataFrame:
    """Post-processed boxes per test image with its image-level probabilities and view;
    with ``engine: ray`` predicted on Ray Data across the cluster (the same predictions)."""
    config = _config(params)
    chosen, postprocessing = _chosen_models(ensemble, postprocessing, config)
    models = chosen.record()
    if not config.model_uri:  # an MLflow model brings the post-processing logged with it
        _refuse_other_models(models, postprocessing)
    tag_active_run(models)
    # The TTA the post-processing was tuned with: they belong together.
    tta, values = prediction_settings(postprocessing)
    if (engine_settings := engine_config(engine)).is_ray:
        from pneumonia_kedro.engines.ray_engine import predict_on_ray  # no Ray for local runs

        prediction = predict_on_ray(chosen, test_image_cache, tta, values, config.batch_size,
                                    config.device, engine_settings, config.progress)
    else:
        prediction = predict(chosen.build(resolve_device(config.device)),
                             cached_squares(test_image_cache), tta, values,
                             config.batch_size, config.progress, desc="test")
    final, classifier_p = prediction.boxes, prediction.classifier_probability
    views = test_image_cache.usable.set_index("patientId")["view_position"]
    final["image_probability"] = final["patientId"].map(prediction.image_probability)
    final["classifier_probability"] = final["patientId"].map(classifier_p) \
        if classifier_p is not None else np.nan
    final["view_position"] = final["patientId"].map(views)
    return final


def check_test_set(test_image_cache: ImageCache, sample_submission: pd.DataFrame) -> dict:
    """The submission's rows (one per input file) against the sample submission's patients;
    raises on a mismatch."""
    rows = pd.DataFrame({"patientId": test_image_cache.index["patientId"]})
    return check_against_sample(rows, sample_submission)


def write_submission(test_predictions: pd.DataFrame, test_image_cache: ImageCache,
                     test_dicoms: DicomFolder, sample_submission: pd.DataFrame,
                     structured_report_skips: dict[str, str], params: dict,
                     ensemble: Ensemble | None = None
                     ) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """The Kaggle submission (one row per input file, sorted), the inference report (naming
    the models of ``ensemble`` that predicted) and the predictions: the run's output set,
    saved together once the SRs are in place."""
    config = _config(params)
    index = test_image_cache.index
    patient_ids = sorted(index["patientId"])
    sizes = {r["patientId"]: (int(r["height"]), int(r["width"]))
             for r in index.loc[index["status"] == "ok"].to_dict("records")}
    submission = build_submission(test_predictions, patient_ids, config.no_box, sizes)
    skipped = index.loc[index["status"] != "ok"]
    # A file the gate left out has the flag that did it; one that did not decode has none.
    by_gate = skipped["flags"].fillna("") != ""
    report = {
        "files": len(index) + len(test_dicoms.rejected),
        "predicted": int((index["status"] == "ok").sum()),
        "with_boxes": int(test_predictions["patientId"].nunique()),
        "boxes": len(test_predictions),
        "skipped": capped(dict(zip(skipped["patientId"], skipped["reason"], strict=True))),
        "undecodable": int((~by_gate).sum()),
        "skipped_by_quality_gate": int(by_gate.sum()),
        "rejected_files": capped(test_dicoms.rejected),
        "quality_flags": quality_summary(index),
        "no_box_convention": config.no_box,
        **check_test_set(test_image_cache, sample_submission),
    }
    if ensemble is not None:  # by their weights, and where they came from
        report["models"] = {**_chosen_models(ensemble, {}, config)[0].record(),
                            "source": config.model_uri or "catalog"}
    if config.dicom_sr:
        report["structured_reports"] = {
            "written": report["predicted"] - len(structured_report_skips),
            "skipped": capped(structured_report_skips)}
    _warn_about_unused_files(report, test_dicoms)
    return submission, report, test_predictions


def _warn_about_unused_files(report: dict, test_dicoms: DicomFolder) -> None:
    """Say on the console which inputs have no prediction, each kind with its own cause."""
    listed = "listed in inference_report.json and written with an empty PredictionString"
    if report["undecodable"]:
        logger.warning("%d file(s) could not be decoded; %s", report["undecodable"], listed)
    if report["skipped_by_quality_gate"]:
        logger.warning("%d file(s) were left out by the input quality gate (settings: "
                       "quality.policies, inference); %s", report["skipped_by_quality_gate"],
                       listed)
    if count := len(test_dicoms.rejected):
        entries = "1 entry" if count == 1 else f"{count} entries"
        logger.warning("%s of %s %s not read, so not in the submission: %s; listed in "
                       "inference_report.json rejected_files", entries, test_dicoms.root,
                       "is" if count == 1 else "are", test_dicoms.not_used())
    skips = report.get("structured_reports", {}).get("skipped", {}).get("count", 0)
    if skips:
        logger.warning("%d predicted image(s) got no DICOM SR; the reasons are in "
                       "inference_report.json structured_reports", skips)


def write_structured_reports(test_predictions: pd.DataFrame, test_image_cache: ImageCache,
                             test_dicoms: DicomFolder, ensemble: Ensemble, params: dict,
                             sample_submission: pd.DataFrame
                             ) -> Iterator[tuple[FolderChunk, dict[str, str]]]:
    """With ``inference.dicom_sr``, one DICOM SR per predicted image (boxes in the source's
    pixels), yielded in chunks that Kedro saves as they come, each with the images so far that
    got no SR and why (an image whose header cannot make one is skipped, not fatal). The last
    chunk is marked: the dataset then swaps the run's whole set in for the earlier run's. With
    the setting off, one empty last chunk (the folder then holds no earlier run's SR).
    The test set is checked against ``sample_submission`` first (``write_submission`` checks
    it again for its report): a mismatch stops the run before any SR is replaced."""
    config = _config(params)
    check_test_set(test_image_cache, sample_submission)
    patient_ids = test_image_cache.usable["patientId"].tolist() if config.dicom_sr else []
    skips: dict[str, str] = {}
    if not patient_ids:
        yield FolderChunk(last=True), skips
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

    def report_or_skip(patient_id: str) -> bytes | None:
        try:
            return report(patient_id)
        except DicomError as exc:
            skips[patient_id] = str(exc)
            return None

    for chunk in folder_chunks(patient_ids, report_or_skip, SR_CHUNK):
        yield chunk, dict(skips)


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
