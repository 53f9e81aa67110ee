"""The evaluation's domain logic: metrics on the validation split, held out from tuning.

The boxes scored are held out from their tuning: each half of the validation patients is
post-processed with the values tuned on the other half (``held_out_postprocessing``); every
metric comes with its bootstrap interval over patients, overall and per breakdown (view
position, detailed class, sex, age band, fold). Plain functions: the evaluate pipeline's nodes
call them.
"""

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
from pneumonia_kedro.config import AT_LEAST_ONE, ConfigError, Range, from_params
from pneumonia_kedro.labels import boxes_array
from pneumonia_kedro.metrics import (
    coco_metrics,
    competition_scores,
    froc,
    image_level_metrics,
)
from pneumonia_kedro.postprocess import PostprocessConfig, image_probabilities, per_image
from pneumonia_kedro.prediction import TTAConfig, postprocessed
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


# Settings the post-processing search replaced: named with what to use instead.
MOVED = {
    "threshold_grid": "evaluate.search.score_threshold (a list; [t] fixes it at t)",
    "postprocess": "evaluate.search (nms_iou, shrink, max_boxes: lists of values to try; "
                   "one value fixes it) and evaluate.label_shift",
}


def evaluate_config(params: dict) -> EvaluateConfig:
    """``params:evaluate`` validated, a moved setting named with its replacement."""
    for key, replacement in MOVED.items():
        if key in params:
            raise ConfigError(f"params:evaluate.{key} is tuned as one search now: use "
                              f"{replacement}")
    return from_params(EvaluateConfig, params, "evaluate")


def patient_truth(patients: pd.DataFrame) -> tuple[list[str], list[np.ndarray]]:
    """The patients' ids and their truth boxes (``xyxy``), in table order."""
    ids = patients["patientId"].tolist()
    return ids, [xywh_to_xyxy(boxes_array(b)) for b in patients["boxes"]]


def truth_by_patient(patients: pd.DataFrame) -> dict[str, np.ndarray]:
    """Truth boxes (``xyxy``) per patientId."""
    return dict(zip(*patient_truth(patients), strict=True))


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
    ids, truth = patient_truth(patients)
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


def held_out_postprocessing(raw: pd.DataFrame, patients: pd.DataFrame,
                            probabilities: pd.Series | None, config: EvaluateConfig
                            ) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Final and candidate boxes of every validation patient, each half post-processed with
    the values tuned on the other half, and those values."""
    base = PostprocessConfig(label_shift=config.label_shift)

    def tune(ids: list[str]) -> tuple[PostprocessConfig, float]:
        tuning = patients.loc[patients["patientId"].isin(set(ids))]
        values, fusion_iou, _ = search_with_fusion(
            raw, truth_by_patient(tuning), base, config.search, config.tta, probabilities,
            config.inclusive_iou)
        return values, fusion_iou

    finals, candidates, chosen = [], [], []
    for reported, (values, fusion_iou) in cross_fit(patients, tune, config.cross_fit_seed):
        own = raw.loc[raw["patientId"].isin(set(reported))]
        final, candidate, _ = postprocessed(
            own, dataclasses.replace(config.tta, fusion_iou=fusion_iou), values, probabilities,
            label_shift=False)
        finals.append(final)
        candidates.append(candidate)
        chosen.append({**dataclasses.asdict(values), "fusion_iou": fusion_iou,
                       "patients": len(reported)})
    return (pd.concat(finals, ignore_index=True), pd.concat(candidates, ignore_index=True),
            chosen)


def scored(final: pd.DataFrame, candidates: pd.DataFrame, patients: pd.DataFrame,
           probabilities: pd.Series, postprocessing: dict, config: EvaluateConfig
           ) -> tuple[dict, dict]:
    """Every metric of the boxes ``final`` (and the ``candidates`` before the score
    threshold), overall and per breakdown, and the headline numbers for MLflow."""
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
    ids, truth = patient_truth(patients)
    metrics["froc_curve"] = froc(truth, *per_image(candidates, ids))["curve"]
    overall = metrics["overall"]
    logger.info("competition metric %s on %d patients at score threshold %.2f",
                "undefined (no image counts)" if overall["competition_metric"] is None
                else f"{overall['competition_metric']:.4f}", len(patients), threshold)
    return metrics, _headline(metrics, threshold)


def _headline(metrics: dict, threshold: float) -> dict:
    """The numbers logged to MLflow, in kedro-mlflow's metrics format."""
    overall, postprocessing = metrics["overall"], metrics["postprocessing"]
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
    # Undefined values (None: no image counts; NaN: e.g. AUC with one class) are left out.
    return {k: {"value": float(v), "step": 0} for k, v in headline.items()
            if v is not None and not np.isnan(v)}
