"""Figures (matplotlib): images with boxes, curves. Each function returns a Figure.

The backend is left to matplotlib (Agg on a headless machine, inline in a notebook).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from pneumonia_kedro.boxes import xywh_to_xyxy, xyxy_to_xywh
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.labels import boxes_array

TRUTH_COLOUR = "#2ca02c"
PREDICTION_COLOUR = "#d62728"


def _draw_boxes(axis: plt.Axes, boxes_xywh: np.ndarray, colour: str,
                scores: Sequence[float] | None = None) -> None:
    for i, (x, y, w, h) in enumerate(boxes_xywh):
        axis.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=1.5))
        if scores is not None:
            axis.text(x, y - 2, f"{scores[i]:.2f}", color=colour, fontsize=7, va="bottom")


def draw_patient(axis: plt.Axes, cache: ImageCache, patient_id: str,
                 truth_xywh: object = None, predicted: pd.DataFrame | None = None,
                 title: str | None = None) -> None:
    """The cached image of ``patient_id`` with truth (green) and predicted (red) boxes,
    both given in original pixels and mapped into the cache."""
    record = cache.index.loc[cache.index["patientId"] == patient_id].iloc[0].to_dict()
    letterbox = cache.letterbox_from_record(record)
    axis.imshow(cache.images[int(record["row"])], cmap="gray", vmin=0, vmax=255)
    if truth_xywh is not None:
        truth = xyxy_to_xywh(letterbox.to_cache(xywh_to_xyxy(boxes_array(truth_xywh))))
        _draw_boxes(axis, truth, TRUTH_COLOUR)
    if predicted is not None and len(predicted):
        boxes = predicted[["x", "y", "width", "height"]].to_numpy(float)
        mapped = xyxy_to_xywh(letterbox.to_cache(xywh_to_xyxy(boxes)))
        _draw_boxes(axis, mapped, PREDICTION_COLOUR, predicted["score"].tolist())
    axis.set_title(title or f"{patient_id[:8]} {record.get('view_position', '')}", fontsize=8)
    axis.axis("off")


def overlay_figure(cache: ImageCache, patient_id: str, predicted: pd.DataFrame | None = None,
                   truth_xywh: object = None) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    draw_patient(axis, cache, patient_id, truth_xywh, predicted)
    figure.tight_layout()
    return figure


def image_grid(cache: ImageCache, patients: pd.DataFrame, predictions: pd.DataFrame | None,
               titles: Sequence[str] | None = None, columns: int = 4) -> plt.Figure:
    """Images of ``patients`` (rows with patientId and boxes) with truth and predictions."""
    n = max(len(patients), 1)
    rows = int(np.ceil(n / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), dpi=100,
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for i, record in enumerate(patients.to_dict("records")):
        predicted = None if predictions is None else \
            predictions.loc[predictions["patientId"] == record["patientId"]]
        draw_patient(axes.flat[i], cache, record["patientId"], record.get("boxes"), predicted,
                     titles[i] if titles else None)
    figure.tight_layout()
    return figure


def line_figure(x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str,
                ylabel: str, title: str, mark_x: float | None = None,
                diagonal: bool = False) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
    for label, values in series.items():
        axis.plot(x if not isinstance(values, tuple) else values[0],
                  values if not isinstance(values, tuple) else values[1], label=label)
    if mark_x is not None:
        axis.axvline(mark_x, color="grey", linestyle="--", linewidth=1)
    if diagonal:
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if len(series) > 1:
        axis.legend()
    figure.tight_layout()
    return figure
