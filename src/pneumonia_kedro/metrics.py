"""Evaluation metrics. The competition metric first, exactly as the RSNA challenge defined it.

Per image and IoU threshold t in 0.40, 0.45, ..., 0.75: predictions are taken in descending
confidence, each matches at most one still-unmatched ground-truth box (the one it overlaps
most) when their IoU is above t; TP / (TP + FP + FN). An image's score is the mean over the
thresholds, the final score the mean over images. Images with neither ground truth nor
prediction are left out; an image without ground truth but with predictions scores 0.

The official text says IoU "greater than" t, the public reference kernel used ">="; the
``inclusive`` argument chooses, and defaults to the official text. IoU is computed on
continuous coordinates (no +1 pixel).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pneumonia_kedro.boxes import as_boxes

IOU_THRESHOLDS = np.round(np.arange(0.40, 0.7501, 0.05), 2)


def _pad(arrays: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(arrays)
    most = max((len(a) for a in arrays), default=0)
    padded = np.zeros((n, max(most, 1), width), dtype=np.float64)
    valid = np.zeros((n, max(most, 1)), dtype=bool)
    for i, array in enumerate(arrays):
        if len(array):
            padded[i, : len(array)] = np.asarray(array, dtype=np.float64).reshape(len(array), width)
            valid[i, : len(array)] = True
    return padded, valid


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of ``xyxy`` boxes, batched: (..., A, 4) x (..., B, 4) -> (..., A, B)."""
    a = boxes_a[..., :, None, :]
    b = boxes_b[..., None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    intersection = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def prefix_true_positives(
    ground_truth: Sequence[object],
    predictions: Sequence[object],
    scores: Sequence[object],
    inclusive: bool = False,
    thresholds: np.ndarray = IOU_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The competition's greedy matching of every image's first k predictions, all k at once.

    Predictions are taken in descending confidence, so the matches of the first k are those
    the matching has made after k steps. Returns ``tp`` (N, P + 1, T): true positives among
    the first k predictions at each IoU threshold; ``n_truth`` (N,); and the confidences in
    that order, padded with -inf (N, P). A score threshold or a cap on boxes per image keeps
    a prefix, so tuning them needs this one pass, not one per value tried.
    """
    if not len(ground_truth) == len(predictions) == len(scores):
        raise ValueError("ground_truth, predictions and scores need one entry per image")
    truth = [as_boxes(b) for b in ground_truth]
    preds = [as_boxes(b) for b in predictions]
    confidences = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
    orders = [np.argsort(-c, kind="stable") for c in confidences]
    gt, gt_valid = _pad(truth, 4)
    pred, pred_valid = _pad([p[o] for p, o in zip(preds, orders, strict=True)], 4)
    ordered, _ = _pad([c[o][:, None] for c, o in zip(confidences, orders, strict=True)], 1)
    ordered = np.where(pred_valid, ordered[..., 0], -np.inf)
    iou = pairwise_iou(pred, gt)  # (N, P, G)
    iou = np.where(pred_valid[:, :, None] & gt_valid[:, None, :], iou, -1.0)
    t = np.asarray(thresholds, dtype=np.float64)[None, :, None]
    n_images, n_thresholds = len(truth), t.shape[1]
    matched = np.zeros((n_images, n_thresholds, gt.shape[1]), dtype=bool)
    tp = np.zeros((n_images, pred.shape[1] + 1, n_thresholds), dtype=np.int64)
    rows = np.arange(n_images)[:, None]
    columns = np.arange(n_thresholds)[None, :]
    for p in range(pred.shape[1]):
        overlap = iou[:, p, None, :]  # (N, 1, G)
        above = overlap >= t if inclusive else overlap > t
        candidates = above & ~matched
        best = np.where(candidates, overlap, -np.inf).argmax(axis=2)  # (N, T)
        hit = candidates.any(axis=2)
        matched[rows, columns, best] |= hit
        tp[:, p + 1] = tp[:, p] + hit
    return tp, gt_valid.sum(axis=1), ordered


def scores_of_prefixes(tp: np.ndarray, n_truth: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Per-image competition score when image i keeps its first ``kept[i, ...]`` predictions
    (any trailing shape, e.g. one column per score threshold); NaN where the image has
    neither truth nor a kept prediction."""
    kept = np.asarray(kept, dtype=np.int64)
    flat = kept.reshape(len(kept), -1)  # (N, K)
    true_positives = np.take_along_axis(tp, flat[:, :, None], axis=1)  # (N, K, T)
    # TP / (TP + FP + FN) with FP = kept - TP and FN = truth - TP.
    denominator = flat[:, :, None] + n_truth[:, None, None] - true_positives
    per_threshold = np.divide(true_positives, denominator,
                              out=np.zeros(denominator.shape), where=denominator > 0)
    result = per_threshold.mean(axis=2)
    result[(flat == 0) & (n_truth[:, None] == 0)] = np.nan
    return result.reshape(kept.shape)


def competition_scores(
    ground_truth: Sequence[object],
    predictions: Sequence[object],
    scores: Sequence[object],
    inclusive: bool = False,
    thresholds: np.ndarray = IOU_THRESHOLDS,
) -> np.ndarray:
    """Per-image competition score; NaN for images with neither ground truth nor prediction.

    ``ground_truth[i]`` and ``predictions[i]`` are ``xyxy`` boxes of image i, ``scores[i]`` the
    predictions' confidences. All images are scored together with padded arrays, so the cost
    is a loop over the largest number of predictions in one image, not over images.
    """
    tp, n_truth, ordered = prefix_true_positives(ground_truth, predictions, scores, inclusive,
                                                 thresholds)
    return scores_of_prefixes(tp, n_truth, np.isfinite(ordered).sum(axis=1))


def competition_metric(ground_truth: Sequence[object], predictions: Sequence[object],
                       scores: Sequence[object], inclusive: bool = False) -> float:
    """Mean competition score over the images that count (0.0 when none does)."""
    return mean_of_counted(competition_scores(ground_truth, predictions, scores, inclusive))


def threshold_curve(ground_truth: Sequence[object], predictions: Sequence[object],
                    scores: Sequence[object], grid: Sequence[float], inclusive: bool = False
                    ) -> list[tuple[float, float]]:
    """(score threshold, competition metric) for each threshold of ``grid``: one matching
    pass, each threshold keeping a prefix of every image's predictions."""
    tp, n_truth, ordered = prefix_true_positives(ground_truth, predictions, scores, inclusive)
    grid = np.asarray(grid, dtype=np.float64)
    kept = (ordered[:, :, None] >= grid[None, None, :]).sum(axis=1)  # (N, thresholds)
    per_image = scores_of_prefixes(tp, n_truth, kept)
    return [(float(threshold), mean_of_counted(per_image[:, j]))
            for j, threshold in enumerate(grid)]


def mean_of_counted(per_image: np.ndarray) -> float:
    """Mean over the images that count (not NaN); 0.0 when none does, as the metric defines."""
    counted = per_image[~np.isnan(per_image)]
    return float(counted.mean()) if counted.size else 0.0


def best_threshold(curve: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The grid threshold with the highest metric (the lowest such threshold on ties)."""
    threshold, metric = max(curve, key=lambda point: (point[1], -point[0]))
    return threshold, metric


def coco_metrics(ground_truth: Sequence[object], predictions: Sequence[object],
                 scores: Sequence[object]) -> dict[str, float]:
    """COCO box AP, AP50, AP75 and AR@100 (pycocotools); negatives are images without
    annotations, so their predictions are false positives."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for image_id, (truth, boxes, confidences) in enumerate(
            zip(ground_truth, predictions, scores, strict=True), start=1):
        images.append({"id": image_id, "width": 1, "height": 1})
        for box in as_boxes(truth):
            x1, y1, x2, y2 = map(float, box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for box, confidence in zip(as_boxes(boxes),
                                   np.asarray(confidences, dtype=float).reshape(-1), strict=True):
            x1, y1, x2, y2 = map(float, box)
            detections.append({"image_id": image_id, "category_id": 1,
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(confidence)})
    names = ("coco_ap", "coco_ap50", "coco_ap75", "coco_ar100")
    if not annotations:
        return dict.fromkeys(names, float("nan"))
    with contextlib.redirect_stdout(io.StringIO()):
        truth_api = COCO()
        truth_api.dataset = {"images": images, "annotations": annotations,
                             "categories": [{"id": 1, "name": "opacity"}]}
        truth_api.createIndex()
        if not detections:
            return dict.fromkeys(names, 0.0)
        result_api = truth_api.loadRes(detections)
        evaluator = COCOeval(truth_api, result_api, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"coco_ap": float(stats[0]), "coco_ap50": float(stats[1]),
            "coco_ap75": float(stats[2]), "coco_ar100": float(stats[8])}


def image_level_metrics(targets: Sequence[int], probabilities: Sequence[float],
                        threshold: float) -> dict:
    """Diagnosis per image from its highest box score: ROC AUC, AP, sensitivity, specificity,
    F1 and the confusion matrix at ``threshold``."""
    from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

    y = np.asarray(targets, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    predicted = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y)) == 2
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else float("nan"),
        "average_precision": float(average_precision_score(y, p)) if both_classes
        else float("nan"),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "f1": float(f1_score(y, predicted, zero_division=0)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "threshold": float(threshold),
    }


FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def froc(ground_truth: Sequence[object], predictions: Sequence[object],
         scores: Sequence[object], iou_threshold: float = 0.4,
         rates: Sequence[float] = FROC_RATES) -> dict:
    """Lesion sensitivity at given false positives per image, and the whole curve.

    A prediction is a hit when its IoU with a not yet found ground-truth box of its image is
    above ``iou_threshold`` (predictions taken in descending confidence per image).
    """
    n_images = len(ground_truth)
    n_lesions = sum(len(as_boxes(t)) for t in ground_truth)
    hits, confidences = [], []
    for raw_truth, raw_boxes, raw_conf in zip(ground_truth, predictions, scores, strict=True):
        truth, boxes = as_boxes(raw_truth), as_boxes(raw_boxes)
        conf = np.asarray(raw_conf, dtype=float).reshape(-1)
        order = np.argsort(-conf, kind="stable")
        found = np.zeros(len(truth), dtype=bool)
        iou = pairwise_iou(boxes[order], truth) if len(truth) else np.zeros((len(boxes), 0))
        for i in range(len(order)):
            candidates = np.where(~found & (iou[i] > iou_threshold), iou[i], -1.0)
            hit = bool(len(truth)) and candidates.max() > 0
            if hit:
                found[int(candidates.argmax())] = True
            hits.append(hit)
            confidences.append(conf[order[i]])
    order = np.argsort(-np.asarray(confidences), kind="stable")
    hit_sorted = np.asarray(hits, dtype=bool)[order]
    sensitivity = np.cumsum(hit_sorted) / max(n_lesions, 1)
    fp_per_image = np.cumsum(~hit_sorted) / max(n_images, 1)
    at_rates = {}
    for rate in rates:
        within = fp_per_image <= rate
        at_rates[str(rate)] = float(sensitivity[within].max()) if within.any() else 0.0
    return {"sensitivity_at_fp_per_image": at_rates,
            "curve": {"fp_per_image": fp_per_image.tolist(), "sensitivity": sensitivity.tolist()}}
