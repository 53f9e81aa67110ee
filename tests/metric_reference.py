"""The competition metric with plain loops: slow, obviously correct, for checking the
vectorised ``metrics.competition_scores`` (tests and benchmarks/metric_speed.py)."""

from __future__ import annotations

from collections.abc import Sequence

from pneumonia_kedro.boxes import as_boxes
from pneumonia_kedro.metrics import IOU_THRESHOLDS


def image_score_reference(truth: object, predictions: object, scores: Sequence[float],
                          inclusive: bool = False) -> float | None:
    """One image's score with plain loops: slow, obviously correct, for checking the
    vectorised ``competition_scores``. None when the image is left out."""
    truth, predictions = as_boxes(truth).tolist(), as_boxes(predictions).tolist()
    if not truth and not predictions:
        return None
    order = sorted(range(len(predictions)), key=lambda i: -float(scores[i]))
    values = []
    for threshold in IOU_THRESHOLDS:
        matched: set[int] = set()
        for i in order:
            best, best_iou = None, -1.0
            for j, g in enumerate(truth):
                if j in matched:
                    continue
                p = predictions[i]
                overlap_w = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
                overlap_h = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
                inter = overlap_w * overlap_h
                union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
                iou = inter / union if union > 0 else 0.0
                above = iou >= threshold if inclusive else iou > threshold
                if above and iou > best_iou:
                    best, best_iou = j, iou
            if best is not None:
                matched.add(best)
        tp = len(matched)
        values.append(tp / (tp + (len(predictions) - tp) + (len(truth) - tp)))
    return sum(values) / len(values)
