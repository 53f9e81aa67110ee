"""Reading the competition's PredictionStrings back: the tests' oracle for what the pipelines,
the served model and the overlays deliver (the product itself only writes them)."""

from __future__ import annotations

import numpy as np

from pneumonia_kedro.submission import SubmissionError


def parse_prediction_string(text: object, where: str = "PredictionString"
                            ) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes xywh (N, 4), confidences (N,))`` from a PredictionString."""
    if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
        return np.zeros((0, 4)), np.zeros(0)
    try:
        values = np.asarray(str(text).split(), dtype=float)
    except ValueError:
        raise SubmissionError(f"{where}: {text!r} holds a value that is not a number") from None
    if not np.isfinite(values).all():
        raise SubmissionError(f"{where}: {text!r} holds a value that is not a finite number")
    if values.size % 5:
        raise SubmissionError(f"{where}: {values.size} numbers, not groups of 5 "
                              "(confidence x y width height)")
    groups = values.reshape(-1, 5)
    return groups[:, 1:], groups[:, 0]
