"""The competition's submission format: ``patientId,PredictionString``.

A PredictionString is zero or more space-separated groups ``confidence x y width height``
(top-left corner, original image pixels); the empty string means no opacity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pneumonia_kedro.errors import PneumoniaKedroError


class SubmissionError(PneumoniaKedroError, ValueError):
    """A submission does not match the competition's format or patients."""


def format_prediction_string(boxes_xywh: np.ndarray, scores: Sequence[float]) -> str:
    """Groups ``confidence x y width height`` in descending confidence."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    return " ".join(
        f"{scores[i]:.4f} {boxes_xywh[i][0]:.1f} {boxes_xywh[i][1]:.1f} "
        f"{boxes_xywh[i][2]:.1f} {boxes_xywh[i][3]:.1f}"
        for i in order
    )


def build_submission(predictions: pd.DataFrame, patient_ids: Sequence[str],
                     no_box: str = "empty",
                     image_sizes: dict[str, tuple[int, int]] | None = None) -> pd.DataFrame:
    """One row per patient, in the given (stable) order.

    ``no_box="whole_image"`` writes the notebook's convention for images without a box (one
    whole-image box with confidence 0.0) instead of the competition's empty string.
    """
    grouped = {pid: rows for pid, rows in predictions.groupby("patientId", sort=False)}
    strings = []
    for pid in patient_ids:
        rows = grouped.get(pid)
        if rows is not None and len(rows):
            strings.append(format_prediction_string(
                rows[["x", "y", "width", "height"]].to_numpy(float),
                rows["score"].to_numpy(float).tolist()))
        elif no_box == "whole_image":
            height, width = (image_sizes or {}).get(pid, (1024, 1024))
            strings.append(f"0.0000 0.0 0.0 {float(width):.1f} {float(height):.1f}")
        else:
            strings.append("")
    return pd.DataFrame({"patientId": list(patient_ids), "PredictionString": strings})


def check_against_sample(submission: pd.DataFrame, sample: pd.DataFrame) -> dict:
    """Compare the submission's patients with the sample submission's; raise on a mismatch."""
    if sample.empty:
        return {"checked_against_sample": False}
    expected, written = set(sample["patientId"]), set(submission["patientId"])
    missing, extra = sorted(expected - written), sorted(written - expected)
    if missing or extra:
        raise SubmissionError(
            f"submission patients differ from the sample submission: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} not in the sample (e.g. {extra[:3]})")
    return {"checked_against_sample": True}
