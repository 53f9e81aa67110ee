"""Nodes of the evaluate pipeline."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pneumonia_kedro.bootstrap import (
    BootstrapConfig,
    mean_interval,
    proportion_interval,
    resample_counts,
    roc_auc_interval,
)
from pneumonia_kedro.boxes import xywh_to_xyxy
from pneumonia_kedro.config import AT_LEAST_ONE, ConfigError, from_params
from pneumonia_kedro.dicom.quality import INFERENCE_QUALITY, QualityConfig
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.inference import predict_cache
from pneumonia_kedro.labels import boxes_array
from pneumonia_kedro.metrics import (
    best_threshold,
    coco_metrics,
    competition_metric,
    competition_scores,
    froc,
    image_level_metrics,
    threshold_curve,
)
from pneumonia_kedro.models import TrainedModel
from pneumonia_kedro.postprocess import (
    PostprocessConfig,
    image_probabilities,
    per_image,
    postprocess,
)
from pneumonia_kedro.prediction import TTAConfig, prediction_settings
from pneumonia_kedro.training import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Prediction, post-processing and the grid the score threshold is tuned over."""

    RANGES = {"batch_size": AT_LEAST_ONE}

    batch_size: int = 16
    device: str = "auto"
    tta: TTAConfig = field(default_factory=TTAConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    threshold_grid: tuple = (0.05, 0.95, 0.05)  # start, stop, step (inclusive)
    inclusive_iou: bool = False
    progress: bool = True

    def grid(self) -> np.ndarray:
        start, stop, step = self.threshold_grid
        return np.round(np.arange(start, stop + step / 2, step), 6)


def _config(params: dict) -> EvaluateConfig:
    return from_params(EvaluateConfig, params, "evaluate")


def predict_validation(trained_model: TrainedModel, validation_image_cache: ImageCache,
                       params: dict) -> pd.DataFrame:
    """Every box the model proposes on the validation images, in original pixels."""
    config = _config(params)
    device = resolve_device(config.device)
    model = trained_model.build(device)
    return predict_cache([model], validation_image_cache, device, config.batch_size,
                         config.tta, config.progress, desc="validation")


def _truth(patients: pd.DataFrame) -> tuple[list[str], list[np.ndarray]]:
    ids = patients["patientId"].tolist()
    return ids, [xywh_to_xyxy(boxes_array(b)) for b in patients["boxes"]]


def tune_threshold(raw_validation_predictions: pd.DataFrame,
                   validation_patients: pd.DataFrame, params: dict
                   ) -> tuple[dict, pd.DataFrame]:
    """The score threshold that maximises the competition metric on the validation split."""
    config = _config(params)
    if "score_threshold" in params.get("postprocess", {}):
        raise ConfigError(
            "params:evaluate.postprocess.score_threshold is tuned on the validation split: "
            "leave it out; to fix it at t, set evaluate.threshold_grid: [t, t, 1]")
    candidates = postprocess(raw_validation_predictions, config.postprocess,
                             apply_threshold=False)
    ids, truth = _truth(validation_patients)
    boxes, scores = per_image(candidates, ids)
    curve = threshold_curve(truth, boxes, scores, config.grid(), config.inclusive_iou)
    threshold, metric = best_threshold(curve)
    logger.info("score threshold %.2f gives the best validation competition metric %.4f",
                threshold, metric)
    chosen = {**dataclasses.asdict(
        dataclasses.replace(config.postprocess, score_threshold=threshold)),
        "tta": dataclasses.asdict(config.tta)}
    return chosen, pd.DataFrame(curve, columns=["score_threshold", "competition_metric"])


def _any_counted(truth: list[np.ndarray], boxes: list[np.ndarray]) -> bool:
    return any(len(t) or len(b) for t, b in zip(truth, boxes, strict=True))


AGE_BANDS = (0, 18, 40, 60, 80)  # band starts in years: 0-17, 18-39, 40-59, 60-79, 80+


def age_band(age: float) -> str:
    """The age band of a PatientAge in years ("unknown" when the header has none)."""
    if age is None or not np.isfinite(age):
        return "unknown"
    start = max(b for b in AGE_BANDS if b <= age)
    following = [b for b in AGE_BANDS if b > start]
    return f"{start}-{following[0] - 1}" if following else f"{start}+"


def _scores(patients: pd.DataFrame, predictions: pd.DataFrame, all_candidates: pd.DataFrame,
            threshold: float, config: EvaluateConfig) -> dict:
    ids, truth = _truth(patients)
    boxes, scores = per_image(predictions, ids)
    candidate_boxes, candidate_scores = per_image(all_candidates, ids)
    probabilities = image_probabilities(all_candidates, ids)
    froc_result = froc(truth, candidate_boxes, candidate_scores)
    targets = patients["Target"].to_numpy(int) == 1
    counts = resample_counts(len(ids), config.bootstrap)
    confidence = config.bootstrap.confidence
    flagged = probabilities >= threshold
    return {
        "images": len(ids),
        # None where no image counts (only negatives, none with a box): the mean is undefined.
        "competition_metric": competition_metric(truth, boxes, scores, config.inclusive_iou)
        if _any_counted(truth, boxes) else None,
        **coco_metrics(truth, candidate_boxes, candidate_scores),
        "image_level": image_level_metrics(patients["Target"].tolist(), probabilities,
                                           threshold),
        "froc": froc_result["sensitivity_at_fp_per_image"],
        # Bootstrap over patients (one image each): {"value", "low", "high"} per metric.
        "intervals": {
            "competition_metric": mean_interval(
                competition_scores(truth, boxes, scores, config.inclusive_iou), counts,
                confidence),
            "roc_auc": roc_auc_interval(targets, probabilities, counts, confidence),
            "sensitivity": proportion_interval(flagged, targets, counts, confidence),
            "specificity": proportion_interval(~flagged, ~targets, counts, confidence),
        },
    }


def _breakdowns(patients: pd.DataFrame) -> dict[str, pd.Series]:
    """The columns the report breaks metrics down by, those the patient table has."""
    columns = {name: patients[name] for name in ("view_position", "detailed_class",
                                                 "patient_sex") if name in patients}
    if "patient_age" in patients:
        columns["age_band"] = patients["patient_age"].astype(float).map(age_band)
    return columns


def evaluate(raw_validation_predictions: pd.DataFrame, validation_patients: pd.DataFrame,
             postprocessing: dict, params: dict) -> tuple[dict, dict, pd.DataFrame]:
    """All metrics on the validation split, overall and by view position and detailed class.

    Returns the full metrics (JSON), the headline numbers for MLflow, and the post-processed
    validation predictions.
    """
    config = _config(params)
    _, chosen = prediction_settings(postprocessing)
    candidates = postprocess(raw_validation_predictions, chosen, apply_threshold=False)
    final = postprocess(raw_validation_predictions, chosen)
    threshold = chosen.score_threshold
    metrics = {"postprocessing": postprocessing,
               "overall": _scores(validation_patients, final, candidates, threshold, config)}
    for name, values in _breakdowns(validation_patients).items():
        metrics[f"by_{name}"] = {
            str(value): _scores(group, final, candidates, threshold, config)
            for value, group in validation_patients.groupby(values.fillna("unknown"))
        }
    ids, truth = _truth(validation_patients)
    metrics["froc_curve"] = froc(truth, *per_image(candidates, ids))["curve"]
    overall = metrics["overall"]
    headline = {
        "competition_metric": overall["competition_metric"],
        "coco_ap": overall["coco_ap"], "coco_ap50": overall["coco_ap50"],
        "coco_ap75": overall["coco_ap75"], "coco_ar100": overall["coco_ar100"],
        "roc_auc": overall["image_level"]["roc_auc"],
        "image_average_precision": overall["image_level"]["average_precision"],
        "sensitivity": overall["image_level"]["sensitivity"],
        "specificity": overall["image_level"]["specificity"],
        "f1": overall["image_level"]["f1"],
        "score_threshold": threshold,
        **{f"froc_sensitivity_at_{k}_fp": v for k, v in overall["froc"].items()},
    }
    for name, interval in overall["intervals"].items():
        headline[f"{name}_ci_low"] = interval["low"]
        headline[f"{name}_ci_high"] = interval["high"]
    # kedro-mlflow's metrics format; undefined values (None: no image counts; NaN: e.g. AUC
    # with one class) are left out.
    headline = {k: {"value": float(v), "step": 0} for k, v in headline.items()
                if v is not None and not np.isnan(v)}
    logger.info("validation competition metric %s at score threshold %.2f",
                "undefined (no image counts)" if overall["competition_metric"] is None
                else f"{overall['competition_metric']:.4f}", threshold)
    return metrics, headline, final


@dataclass(frozen=True)
class ServingConfig:
    """What the served MLflow model accepts."""

    RANGES = {"max_files_per_request": AT_LEAST_ONE, "max_file_bytes": AT_LEAST_ONE}

    max_files_per_request: int = 64
    max_file_bytes: int = 64 * 2**20
    allow_paths: bool = False  # paths let a caller read any file the server can: off
    no_box: str = "empty"
    quality: QualityConfig = INFERENCE_QUALITY
    dicom_sr: bool = False  # answer with a base64 DICOM SR per file (carries patient identity)


def package_model(trained_model: TrainedModel, postprocessing: dict, params: dict) -> dict:
    """The trained model with the preprocessing and tuned post-processing it is served with."""
    config = from_params(ServingConfig, params, "serving")
    settings = {"image_size": trained_model.config.image_size, "postprocess": postprocessing,
                **dataclasses.asdict(config)}
    return {"model": trained_model, "settings": settings}
