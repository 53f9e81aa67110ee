"""Weighted boxes fusion of several predictions of one image: TTA variants and fold models.

Weighted boxes fusion (Solovyev et al., the ``ensemble-boxes`` package): a box found by only
some variants keeps its place but loses score in proportion, where concatenating then NMS
kept the single most confident variant's box and score.

``fuse_variants`` is the one place boxes are fused: ``prediction.predict`` fuses with it while
predicting, and the post-processing search fuses the same unfused table at each fusion IoU it
tries. Each image is fused in its own original pixels, so its fused boxes do not depend on
which other images were predicted with it (a served request or the whole test set).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pneumonia_kedro.boxes import xywh_to_xyxy, xyxy_to_xywh
from pneumonia_kedro.postprocess import predictions_table


def fuse(predictions: Sequence[tuple[np.ndarray, np.ndarray]], size: float, iou: float,
         skip_score: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Weighted boxes fusion of one image's predictions by several variants or models.

    ``predictions``: (``xyxy`` boxes in pixels of a ``size`` square, scores) per variant.
    A box that every variant found keeps its mean score; one found by k of n variants gets
    k/n of it. The fused boxes come back in descending score order.
    """
    if not any(len(scores) for _, scores in predictions):
        return np.zeros((0, 4)), np.zeros(0)
    # Imported here: it brings numba, which a run without fusion (and the GPU check) skips.
    from ensemble_boxes import weighted_boxes_fusion

    boxes = [np.clip(np.asarray(b, np.float64).reshape(-1, 4) / size, 0.0, 1.0)
             for b, _ in predictions]
    scores = [np.asarray(s, np.float64) for _, s in predictions]
    fused, fused_scores, _ = weighted_boxes_fusion(
        boxes, scores, [np.zeros(len(s)) for s in scores], iou_thr=iou,
        skip_box_thr=skip_score)
    order = np.argsort(-fused_scores, kind="stable")
    return fused[order] * size, fused_scores[order]


def _fuse_image(xyxy: np.ndarray, scores: np.ndarray, variant: np.ndarray, runs: int,
                iou: float, skip_score: float) -> tuple[np.ndarray, np.ndarray]:
    """One image's boxes of ``runs`` variants fused; shifted and scaled into [0, 1] as a
    whole (the fusion is unchanged by that), so no box is distorted or clipped."""
    low = float(min(0.0, xyxy.min()))
    size = float(max(1.0, xyxy.max() - low))
    boxes, fused_scores = fuse([(xyxy[variant == v] - low, scores[variant == v])
                                for v in range(runs)], size, iou, skip_score)
    return boxes + low, fused_scores


def fuse_variants(raw: pd.DataFrame, iou: float, skip_score: float = 0.0) -> pd.DataFrame:
    """A table of unfused predictions (``variant`` of ``variants`` runs per row, boxes not yet
    clipped to their ``image_width`` x ``image_height``, as ``prediction.predict`` keeps them)
    fused per image and clipped; a table without variants is returned as it is."""
    if "variant" not in raw:
        return raw
    runs = int(raw["variants"].max()) if len(raw) else 1
    xyxy = xywh_to_xyxy(raw[["x", "y", "width", "height"]].to_numpy(float))
    scores = raw["score"].to_numpy(float)
    if runs > 1:
        ids, fused_boxes, fused_scores = [], [], []
        variant = raw["variant"].to_numpy(int)
        for patient_id, rows in raw.groupby("patientId", sort=False).indices.items():
            boxes, image_scores = _fuse_image(xyxy[rows], scores[rows], variant[rows], runs,
                                              iou, skip_score)
            ids += [patient_id] * len(image_scores)
            fused_boxes.append(boxes)
            fused_scores.append(image_scores)
        xyxy = np.concatenate(fused_boxes) if fused_boxes else np.zeros((0, 4))
        scores = np.concatenate(fused_scores) if fused_scores else np.zeros(0)
    else:
        ids = raw["patientId"].tolist()
    if not ids:
        return predictions_table([], [], [])
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).copy()
    if "image_width" in raw:
        bounds = raw.groupby("patientId")[["image_width", "image_height"]].first()
        width = bounds["image_width"].reindex(ids).to_numpy(float)[:, None]
        height = bounds["image_height"].reindex(ids).to_numpy(float)[:, None]
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
    box = xyxy_to_xywh(xyxy)
    return pd.DataFrame({"patientId": ids, "x": box[:, 0], "y": box[:, 1],
                         "width": box[:, 2], "height": box[:, 3], "score": scores})
