"""Nodes of the evaluate pipeline."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import pandas as pd

from pneumonia_kedro.classifier import TrainedClassifier
from pneumonia_kedro.config import AT_LEAST_ONE, ConfigError, from_params
from pneumonia_kedro.dicom.quality_settings import inference_gate
from pneumonia_kedro.ensemble import Ensemble, tag_active_run
from pneumonia_kedro.evaluation import (
    EvaluateConfig,
    evaluate_config,
    held_out_postprocessing,
    scored,
    truth_by_patient,
)
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.inference import cached_squares
from pneumonia_kedro.model_package import package_detector
from pneumonia_kedro.models import TrainedModel
from pneumonia_kedro.postprocess import PostprocessConfig
from pneumonia_kedro.prediction import postprocessed, predict, prediction_settings
from pneumonia_kedro.training import resolve_device
from pneumonia_kedro.tuning import search_with_fusion

logger = logging.getLogger(__name__)


def _config(params: dict) -> EvaluateConfig:
    return evaluate_config(params)


def gather_ensemble(*members: TrainedModel | TrainedClassifier) -> Ensemble:
    """The detector(s) and classifier(s) that predict together: the trained model, or one
    per cross-validation fold, passed as (detector, classifier) pairs."""
    return Ensemble.of(*members)


def predict_validation(ensemble: Ensemble, image_cache: ImageCache, patients: pd.DataFrame,
                       params: dict) -> pd.DataFrame:
    """Every box the model(s) propose on the patients' images, in original pixels, per model
    and TTA variant (``variant`` of ``variants``)."""
    config = _config(params)
    detectors = ensemble.build(resolve_device(config.device), classifiers=False)
    # Unfused: the post-processing search fuses the variants at each fusion IoU it tries.
    return predict(detectors, cached_squares(image_cache, patients["patientId"].tolist()),
                   config.tta, None, config.batch_size, config.progress,
                   desc="validation").variants


def predict_validation_probabilities(ensemble: Ensemble, image_cache: ImageCache,
                                     patients: pd.DataFrame, params: dict) -> pd.DataFrame:
    """The classifier's opacity probability per image of the patients (the mean over the
    ensemble's classifiers; mirrored too with ``tta.hflip``, as the detector's boxes are)."""
    config = _config(params)
    if not ensemble.has_classifiers:
        raise ConfigError("the ensemble has no image-level classifier: run the classify "
                          "pipeline (or the cross_validation pipeline) first")
    classifiers = ensemble.build(resolve_device(config.device), detectors=False)
    prediction = predict(classifiers, cached_squares(image_cache,
                                                     patients["patientId"].tolist()),
                         config.tta, None, config.batch_size, config.progress,
                         desc="classifier")
    return prediction.classifier_probability.rename("probability").reset_index()


def _probabilities(table: pd.DataFrame) -> pd.Series:
    return table.set_index("patientId")["probability"]


def tune_postprocessing(ensemble: Ensemble, raw_validation_predictions: pd.DataFrame,
                        validation_patients: pd.DataFrame,
                        validation_image_probabilities: pd.DataFrame, params: dict
                        ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The post-processing that maximises the competition metric on all validation patients
    (what inference uses, with the ``models`` of ``ensemble`` it was tuned for: inference
    refuses others), the threshold curve at the other chosen values, and every combination
    tried."""
    config = _config(params)
    base = PostprocessConfig(label_shift=config.label_shift)
    chosen, fusion_iou, table = search_with_fusion(
        raw_validation_predictions, truth_by_patient(validation_patients), base,
        config.search, config.tta, _probabilities(validation_image_probabilities),
        config.inclusive_iou)
    logger.info("post-processing tuned on %d patients over %d combinations: %s, fusion IoU "
                "%g", len(validation_patients), config.search.size(), chosen, fusion_iou)
    at_chosen = (table["fusion_iou"] == fusion_iou).to_numpy(copy=True)
    for name in ("nms_iou", "shrink", "max_boxes"):
        at_chosen &= table[name] == getattr(chosen, name)
    at_chosen &= (table["gating_rule"] == chosen.gating.rule) & \
        (table["gating_threshold"] == chosen.gating.threshold)
    curve = table.loc[at_chosen, ["score_threshold", "competition_metric"]]
    # The TTA it was tuned with, at the fusion IoU chosen: inference predicts with it.
    tta = {**dataclasses.asdict(config.tta), "fusion_iou": fusion_iou}
    models = ensemble.record()
    tag_active_run(models)
    return ({**dataclasses.asdict(chosen), "tta": tta, "models": models},
            curve.reset_index(drop=True), table)


def evaluate(raw_validation_predictions: pd.DataFrame, validation_patients: pd.DataFrame,
             validation_image_probabilities: pd.DataFrame, postprocessing: dict, params: dict
             ) -> tuple[dict, dict, pd.DataFrame]:
    """All metrics on the validation split, overall and by view position, detailed class,
    sex and age band, each with its bootstrap interval.

    The boxes scored are held out from their tuning: each half of the validation patients is
    post-processed with the values tuned on the other half (``postprocessing``, tuned on
    all of them, is what inference delivers). Returns the full metrics (JSON), the headline
    numbers for MLflow, and the validation predictions scored.
    """
    config = _config(params)
    probabilities = _probabilities(validation_image_probabilities)
    final, candidates, held_out = held_out_postprocessing(
        raw_validation_predictions, validation_patients, probabilities, config)
    metrics, headline = scored(final, candidates, validation_patients, probabilities,
                               postprocessing, config)
    return {**metrics, "held_out_postprocessing": held_out}, headline, final


def evaluate_delivered(raw_predictions: pd.DataFrame, patients: pd.DataFrame,
                       image_probabilities_table: pd.DataFrame, postprocessing: dict,
                       params: dict) -> tuple[dict, dict, pd.DataFrame]:
    """Like ``evaluate``, with the delivered ``postprocessing`` as it is: for patients it was
    not tuned on (the validation split, when it was tuned on out-of-fold predictions)."""
    config = _config(params)
    probabilities = _probabilities(image_probabilities_table)
    tta, chosen = prediction_settings(postprocessing)
    final, candidates, _ = postprocessed(raw_predictions, tta, chosen, probabilities,
                                         label_shift=False)
    metrics, headline = scored(final, candidates, patients, probabilities, postprocessing,
                               config)
    return metrics, headline, final


@dataclass(frozen=True)
class ServingConfig:
    """What the served MLflow model accepts."""

    RANGES = {"max_files_per_request": AT_LEAST_ONE, "max_file_bytes": AT_LEAST_ONE}

    max_files_per_request: int = 64
    max_file_bytes: int = 64 * 2**20
    allow_paths: bool = False  # paths let a caller read any file the server can: off
    no_box: str = "empty"
    dicom_sr: bool = False  # answer with a base64 DICOM SR per file (carries patient identity)


def package_model(ensemble: Ensemble, postprocessing: dict, params: dict,
                  quality_params: dict, appearance_reference: dict | None) -> dict[str, bytes]:
    """The servable MLflow model's files: the trained detector(s) and classifier(s) with the
    preprocessing, tuned post-processing and input quality gate (the inference policies of
    ``quality``, with the training images' appearance reference) they are served with."""
    config = from_params(ServingConfig, params, "serving")
    settings = {"image_size": ensemble.image_size, "postprocess": postprocessing,
                "members": ensemble.names, **dataclasses.asdict(config),
                "quality": inference_gate(quality_params, appearance_reference).as_dict()}
    return package_detector(ensemble, settings)
