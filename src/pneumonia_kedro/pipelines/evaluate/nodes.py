"""Nodes of the evaluate pipeline."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pneumonia_kedro.bootstrap import (
    BootstrapConfig,
    coco_ap_interval,
    mean_interval,
    proportion_interval,
    resample_counts,
    roc_auc_interval,
)
from pneumonia_kedro.boxes import xywh_to_xyxy
from pneumonia_kedro.classifier import TrainedClassifier
from pneumonia_kedro.config import AT_LEAST_ONE, ConfigError, Range, from_params
from pneumonia_kedro.dicom.quality import INFERENCE_QUALITY, QualityConfig
from pneumonia_kedro.ensemble import Ensemble, ensemble_probabilities
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.inference import predict_cache
from pneumonia_kedro.labels import boxes_array
from pneumonia_kedro.metrics import (
    coco_metrics,
    competition_scores,
    froc,
    image_level_metrics,
)
from pneumonia_kedro.models import TrainedModel
from pneumonia_kedro.postprocess import (
    PostprocessConfig,
    image_probabilities,
    per_image,
    postprocess,
)
from pneumonia_kedro.prediction import TTAConfig, fuse_variants, prediction_settings
from pneumonia_kedro.training import resolve_device
from pneumonia_kedro.tuning import SearchSpace, cross_fit, search_with_fusion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Prediction, the post-processing search, and the bootstrap of the reported metrics."""

    RANGES = {"batch_size": AT_LEAST_ONE, "label_shift": Range(0, 2, low_open=True)}

    batch_size: int = 16
    device: str = "auto"
    tta: TTAConfig = field(default_factory=TTAConfig)
    search: SearchSpace = field(default_factory=SearchSpace)
    label_shift: float = 1.0
    cross_fit_seed: int = 0
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    inclusive_iou: bool = False
    progress: bool = True


_MOVED = {
    "threshold_grid": "evaluate.search.score_threshold (a list; [t] fixes it at t)",
    "postprocess": "evaluate.search (nms_iou, shrink, max_boxes: lists of values to try; "
                   "one value fixes it) and evaluate.label_shift",
}


def _config(params: dict) -> EvaluateConfig:
    for key, replacement in _MOVED.items():
        if key in params:
            raise ConfigError(f"params:evaluate.{key} is tuned as one search now: use "
                              f"{replacement}")
    return from_params(EvaluateConfig, params, "evaluate")


def gather_ensemble(*members: TrainedModel | TrainedClassifier) -> Ensemble:
    """The detector(s) and classifier(s) that predict together: the trained model, or one
    per cross-validation fold, passed as (detector, classifier) pairs."""
    return Ensemble.of(*members)


def predict_validation(ensemble: Ensemble, image_cache: ImageCache, patients: pd.DataFrame,
                       params: dict) -> pd.DataFrame:
    """Every box the model(s) propose on the patients' images, in original pixels, per model
    and TTA variant (``variant`` of ``variants``)."""
    config = _config(params)
    device = resolve_device(config.device)
    # Unfused: the post-processing search fuses the variants at each fusion IoU it tries.
    return predict_cache(ensemble.build(device), image_cache, device, config.batch_size,
                         config.tta, config.progress,
                         patient_ids=patients["patientId"].tolist(), desc="validation",
                         fused=False)


def predict_validation_probabilities(ensemble: Ensemble, image_cache: ImageCache,
                                     patients: pd.DataFrame, params: dict) -> pd.DataFrame:
    """The classifier's opacity probability per image of the patients (the mean over the
    ensemble's classifiers; mirrored too with ``tta.hflip``, as the detector's boxes are)."""
    config = _config(params)
    device = resolve_device(config.device)
    probabilities = ensemble_probabilities(ensemble, image_cache, device, config.batch_size,
                                           config.tta.hflip, patients["patientId"].tolist())
    if probabilities is None:
        raise ConfigError("the ensemble has no image-level classifier: run the classify "
                          "pipeline (or the cross_validation pipeline) first")
    return probabilities.rename("probability").reset_index()


def _probabilities(table: pd.DataFrame) -> pd.Series:
    return table.set_index("patientId")["probability"]


def _truth(patients: pd.DataFrame) -> tuple[list[str], list[np.ndarray]]:
    ids = patients["patientId"].tolist()
    return ids, [xywh_to_xyxy(boxes_array(b)) for b in patients["boxes"]]


def _truth_by_patient(patients: pd.DataFrame) -> dict[str, np.ndarray]:
    return dict(zip(*_truth(patients), strict=True))


def tune_postprocessing(raw_validation_predictions: pd.DataFrame,
                        validation_patients: pd.DataFrame,
                        validation_image_probabilities: pd.DataFrame, params: dict
                        ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The post-processing that maximises the competition metric on all validation patients
    (what inference uses), the threshold curve at the other chosen values, and every
    combination tried."""
    config = _config(params)
    base = PostprocessConfig(label_shift=config.label_shift)
    chosen, fusion_iou, table = search_with_fusion(
        raw_validation_predictions, _truth_by_patient(validation_patients), base,
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
    return ({**dataclasses.asdict(chosen), "tta": tta}, curve.reset_index(drop=True), table)


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
    # One matching pass for the metric and its interval.
    per_image_scores = competition_scores(truth, boxes, scores, config.inclusive_iou)
    counted = ~np.isnan(per_image_scores)
    return {
        "images": len(ids),
        # None where no image counts (only negatives, none with a box): the mean is undefined.
        "competition_metric": float(per_image_scores[counted].mean()) if counted.any()
        else None,
        **coco_metrics(truth, candidate_boxes, candidate_scores),
        "image_level": image_level_metrics(patients["Target"].tolist(), probabilities,
                                           threshold),
        "froc": froc_result["sensitivity_at_fp_per_image"],
        # Bootstrap over patients (one image each): {"value", "low", "high"} per metric.
        "intervals": {
            "competition_metric": mean_interval(per_image_scores, counts, confidence),
            "coco_ap": coco_ap_interval(truth, candidate_boxes, candidate_scores, counts,
                                        confidence),
            "roc_auc": roc_auc_interval(targets, probabilities, counts, confidence),
            "sensitivity": proportion_interval(flagged, targets, counts, confidence),
            "specificity": proportion_interval(~flagged, ~targets, counts, confidence),
        },
    }


def _breakdowns(patients: pd.DataFrame) -> dict[str, pd.Series]:
    """The columns the report breaks metrics down by, those the patient table has."""
    columns = {name: patients[name] for name in ("view_position", "detailed_class",
                                                 "patient_sex", "fold") if name in patients}
    if "patient_age" in patients:
        columns["age_band"] = patients["patient_age"].astype(float).map(age_band)
    return columns


def classifier_metrics(patients: pd.DataFrame, probabilities: pd.Series,
                       postprocessing: dict, config: EvaluateConfig) -> dict:
    """The image-level classifier on its own: ROC AUC, and sensitivity and specificity at
    the tuned point (the gating threshold with ``drop_below``, else 0.5), with intervals."""
    gating = postprocessing.get("gating", {"rule": "none", "threshold": 0.0})
    point = gating["threshold"] if gating["rule"] == "drop_below" else 0.5
    p = probabilities.reindex(patients["patientId"]).to_numpy(float)
    targets = patients["Target"].to_numpy(int) == 1
    counts = resample_counts(len(p), config.bootstrap)
    confidence = config.bootstrap.confidence
    return {
        "threshold": point,
        **image_level_metrics(targets.astype(int).tolist(), p, point),
        "intervals": {
            "roc_auc": roc_auc_interval(targets, p, counts, confidence),
            "sensitivity": proportion_interval(p >= point, targets, counts, confidence),
            "specificity": proportion_interval(p < point, ~targets, counts, confidence),
        },
    }


def _postprocessed(raw: pd.DataFrame, values: PostprocessConfig, fusion_iou: float,
                   skip_score: float, probabilities: pd.Series | None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The variants fused at ``fusion_iou``, then the final boxes (``values`` applied) and
    the candidates (all but the score threshold) that the metrics score."""
    fused = fuse_variants(raw, fusion_iou, skip_score)
    return (postprocess(fused, values, probabilities=probabilities),
            postprocess(fused, values, apply_threshold=False, probabilities=probabilities))


def held_out_postprocessing(raw: pd.DataFrame, patients: pd.DataFrame,
                            probabilities: pd.Series | None, config: EvaluateConfig
                            ) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Final and candidate boxes of every validation patient, each half post-processed with
    the values tuned on the other half, and those values."""
    base = PostprocessConfig(label_shift=config.label_shift)

    def tune(ids: list[str]) -> tuple[PostprocessConfig, float]:
        tuning = patients.loc[patients["patientId"].isin(set(ids))]
        values, fusion_iou, _ = search_with_fusion(
            raw, _truth_by_patient(tuning), base, config.search, config.tta, probabilities,
            config.inclusive_iou)
        return values, fusion_iou

    finals, candidates, chosen = [], [], []
    for reported, (values, fusion_iou) in cross_fit(patients, tune, config.cross_fit_seed):
        own = raw.loc[raw["patientId"].isin(set(reported))]
        final, candidate = _postprocessed(own, values, fusion_iou, config.tta.skip_score,
                                          probabilities)
        finals.append(final)
        candidates.append(candidate)
        chosen.append({**dataclasses.asdict(values), "fusion_iou": fusion_iou,
                       "patients": len(reported)})
    return (pd.concat(finals, ignore_index=True), pd.concat(candidates, ignore_index=True),
            chosen)


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
    metrics, headline = _metrics(final, candidates, validation_patients, probabilities,
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
    final, candidates = _postprocessed(raw_predictions, chosen, tta.fusion_iou, tta.skip_score,
                                       probabilities)
    metrics, headline = _metrics(final, candidates, patients, probabilities, postprocessing,
                                 config)
    return metrics, headline, final


def _metrics(final: pd.DataFrame, candidates: pd.DataFrame, patients: pd.DataFrame,
             probabilities: pd.Series, postprocessing: dict, config: EvaluateConfig
             ) -> tuple[dict, dict]:
    # Sensitivity and specificity at the threshold delivered to inference.
    threshold = float(postprocessing["score_threshold"])
    metrics = {"postprocessing": postprocessing,
               "overall": _scores(patients, final, candidates, threshold, config),
               "classifier": classifier_metrics(patients, probabilities, postprocessing,
                                                config)}
    for name, values in _breakdowns(patients).items():
        metrics[f"by_{name}"] = {
            str(value): _scores(group, final, candidates, threshold, config)
            for value, group in patients.groupby(values.fillna("unknown"))
        }
    ids, truth = _truth(patients)
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
        **{f"tuned_{name}": postprocessing[name] for name in ("nms_iou", "shrink", "max_boxes")},
        **{f"froc_sensitivity_at_{k}_fp": v for k, v in overall["froc"].items()},
    }
    for name, interval in overall["intervals"].items():
        headline[f"{name}_ci_low"] = interval["low"]
        headline[f"{name}_ci_high"] = interval["high"]
    for name, interval in metrics["classifier"]["intervals"].items():
        headline[f"classifier_{name}"] = interval["value"]
        headline[f"classifier_{name}_ci_low"] = interval["low"]
        headline[f"classifier_{name}_ci_high"] = interval["high"]
    # kedro-mlflow's metrics format; undefined values (None: no image counts; NaN: e.g. AUC
    # with one class) are left out.
    headline = {k: {"value": float(v), "step": 0} for k, v in headline.items()
                if v is not None and not np.isnan(v)}
    logger.info("competition metric %s on %d patients at score threshold %.2f",
                "undefined (no image counts)" if overall["competition_metric"] is None
                else f"{overall['competition_metric']:.4f}", len(patients), threshold)
    return metrics, headline


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


def package_model(ensemble: Ensemble, postprocessing: dict, params: dict) -> dict:
    """The trained detector(s) and classifier(s) with the preprocessing and tuned
    post-processing they are served with."""
    config = from_params(ServingConfig, params, "serving")
    settings = {"image_size": ensemble.image_size, "postprocess": postprocessing,
                "members": ensemble.names, **dataclasses.asdict(config)}
    return {"ensemble": ensemble, "settings": settings}
