"""From raw detector output to the boxes that are submitted.

Raw predictions are a long table: one row per box, ``patientId, x, y, width, height, score``
in original image pixels (``xywh``). Post-processing, per image: non-maximum suppression,
at most ``max_boxes``, shrinking each box about its centre (the winners shrank to ~87.5-90 %
because the test labels were a consensus of readers), and the score threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torchvision.ops import batched_nms

from pneumonia_kedro.boxes import xywh_to_xyxy
from pneumonia_kedro.config import AT_LEAST_ONE, PROBABILITY, Range

PREDICTION_COLUMNS = ("patientId", "x", "y", "width", "height", "score")


@dataclass(frozen=True)
class GatingConfig:
    """How an image-level opacity probability ``p`` (the classifier's) changes box scores:
    ``none``; ``product``: score * p; ``geometric``: sqrt(score * p); ``drop_below``: no box
    on images with p below ``threshold``."""

    RULES = ("none", "product", "geometric", "drop_below")
    RANGES = {"threshold": PROBABILITY}

    rule: Literal["none", "product", "geometric", "drop_below"] = "none"
    threshold: float = 0.0


@dataclass(frozen=True)
class PostprocessConfig:
    """Post-processing of raw predictions; evaluation tunes all but ``label_shift``.

    ``label_shift`` is not tuned: it scales the delivered boxes (inference, the served model)
    about their centres for a user whose readers draw boxes differently from the training
    labels (the RSNA test set was a consensus of readers, with tighter boxes). Evaluation
    never applies it.
    """

    RANGES = {"score_threshold": PROBABILITY, "nms_iou": PROBABILITY,
              "max_boxes": AT_LEAST_ONE, "shrink": Range(0, 2, low_open=True),
              "label_shift": Range(0, 2, low_open=True)}

    score_threshold: float = 0.5
    nms_iou: float = 0.1
    max_boxes: int = 4
    shrink: float = 1.0  # 0.875 keeps 87.5 % of each side, about the box centre
    gating: GatingConfig = field(default_factory=GatingConfig)
    label_shift: float = 1.0


def empty_predictions() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c != "patientId" else "object")
                         for c in PREDICTION_COLUMNS})


def predictions_table(patient_ids: list[str], boxes_xywh: list[np.ndarray],
                      scores: list[np.ndarray]) -> pd.DataFrame:
    """The long prediction table from per-image arrays."""
    rows = [
        (pid, *map(float, box), float(score))
        for pid, image_boxes, image_scores in zip(patient_ids, boxes_xywh, scores, strict=True)
        for box, score in zip(image_boxes, image_scores, strict=True)
    ]
    if not rows:
        return empty_predictions()
    return pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))


def per_image(predictions: pd.DataFrame, patient_ids: list[str]
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``xyxy`` boxes and scores per patient of ``patient_ids`` (empty where none)."""
    grouped = {pid: rows for pid, rows in predictions.groupby("patientId", sort=False)}
    boxes, scores = [], []
    for pid in patient_ids:
        rows = grouped.get(pid)
        if rows is None:
            boxes.append(np.zeros((0, 4)))
            scores.append(np.zeros(0))
        else:
            boxes.append(xywh_to_xyxy(rows[["x", "y", "width", "height"]].to_numpy(float)))
            scores.append(rows["score"].to_numpy(float))
    return boxes, scores


def shrink_boxes(predictions: pd.DataFrame, factor: float) -> pd.DataFrame:
    """Every box scaled by ``factor`` about its centre."""
    if factor == 1.0 or predictions.empty:
        return predictions
    result = predictions.copy()
    cx = result["x"] + result["width"] / 2
    cy = result["y"] + result["height"] / 2
    result["width"] = result["width"] * factor
    result["height"] = result["height"] * factor
    result["x"] = cx - result["width"] / 2
    result["y"] = cy - result["height"] / 2
    return result


def gate(predictions: pd.DataFrame, probabilities: pd.Series | None,
         gating: GatingConfig) -> pd.DataFrame:
    """Box scores combined with each image's opacity probability (indexed by patientId)."""
    if gating.rule == "none" or predictions.empty:
        return predictions
    if probabilities is None:
        raise ValueError(f"gating rule {gating.rule!r} needs image-level probabilities")
    p = predictions["patientId"].map(probabilities).to_numpy(float)
    if np.isnan(p).any():
        missing = predictions.loc[np.isnan(p), "patientId"].iloc[0]
        raise ValueError(f"no image-level probability for {missing}")
    result = predictions.copy()
    if gating.rule == "product":
        result["score"] = result["score"] * p
    elif gating.rule == "geometric":
        result["score"] = np.sqrt(result["score"] * p)
    else:
        result = result.loc[p >= gating.threshold]
    return result.reset_index(drop=True)


def postprocess(predictions: pd.DataFrame, config: PostprocessConfig,
                apply_threshold: bool = True, probabilities: pd.Series | None = None,
                apply_label_shift: bool = False) -> pd.DataFrame:
    """NMS, top ``max_boxes``, shrink, gating by the image probabilities, then (optionally)
    the score threshold, per image. ``apply_label_shift`` for the delivered boxes only."""
    if predictions.empty:
        return empty_predictions()
    # One call for every image: boxes of different patients never suppress each other.
    images, _ = pd.factorize(predictions["patientId"], sort=True)
    xyxy = torch.as_tensor(xywh_to_xyxy(
        predictions[["x", "y", "width", "height"]].to_numpy(float)))
    scores = torch.tensor(predictions["score"].to_numpy(float))  # a copy: may be read-only
    keep = batched_nms(xyxy, scores, torch.as_tensor(images), config.nms_iou).numpy()
    # batched_nms orders by score; a stable sort by patient keeps that order within each.
    result = predictions.iloc[keep].assign(_image=images[keep])
    result = result.sort_values("_image", kind="stable").groupby("_image", sort=False) \
        .head(config.max_boxes).drop(columns="_image").reset_index(drop=True)
    factor = config.shrink * (config.label_shift if apply_label_shift else 1.0)
    result = gate(shrink_boxes(result, factor), probabilities, config.gating)
    if apply_threshold:
        result = result.loc[result["score"] >= config.score_threshold]
    return result.reset_index(drop=True).loc[:, list(PREDICTION_COLUMNS)]


def image_probabilities(predictions: pd.DataFrame, patient_ids: list[str]) -> np.ndarray:
    """Image-level opacity probability: the highest box score (0 when there is no box)."""
    best = predictions.groupby("patientId")["score"].max()
    return best.reindex(patient_ids).fillna(0.0).to_numpy(float)
