"""95 % bootstrap intervals over patients for the evaluation's headline metrics.

One image per patient, so resampling images is resampling patients. All resamples are drawn
at once as a (resamples, images) matrix of counts (how often each image was drawn), and every
metric is a weighted sum over that matrix: 1,000 resamples of 5,000 images take well under a
second, where re-running the metric 1,000 times took minutes. Percentile intervals; the same
seed gives the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pneumonia_kedro.config import AT_LEAST_ONE, Range


@dataclass(frozen=True)
class BootstrapConfig:
    """How many resamples, the interval's confidence and the seed."""

    RANGES = {"resamples": AT_LEAST_ONE, "confidence": Range(0, 1, low_open=True,
                                                             high_open=True)}

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


def resample_counts(n_images: int, config: BootstrapConfig) -> np.ndarray:
    """(resamples, n_images) int32: how often each image is drawn in each resample."""
    rng = np.random.default_rng(config.seed)
    if n_images == 0:
        return np.zeros((config.resamples, 0), dtype=np.int32)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images),
                           size=config.resamples).astype(np.int32)


def _interval(point: float, estimates: np.ndarray, confidence: float) -> dict:
    finite = estimates[np.isfinite(estimates)]
    if not np.isfinite(point) or finite.size == 0:
        return {"value": float(point), "low": float("nan"), "high": float("nan")}
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return {"value": float(point), "low": float(low), "high": float(high)}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan),
                     where=denominator > 0)


def _means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of ``weights``, the weighted mean of the ``values`` that are not NaN."""
    values = np.asarray(values, dtype=np.float64)
    counted = ~np.isnan(values)
    return _ratio(weights @ np.where(counted, values, 0.0), weights @ counted)


def mean_interval(values: np.ndarray, counts: np.ndarray, confidence: float = 0.95) -> dict:
    """Mean of per-image ``values`` over those that are not NaN (the competition metric: an
    image with neither truth nor prediction does not count), with its interval."""
    point = _means(values, np.ones((1, len(values))))[0]
    return _interval(float(point), _means(values, counts.astype(np.float64)), confidence)


def mean_difference_interval(values: np.ndarray, reference: np.ndarray, counts: np.ndarray,
                             confidence: float = 0.95) -> dict:
    """``mean_interval(values)`` minus ``mean_interval(reference)`` for two scorings of the
    same images, paired: both means are taken on the same resamples, so the interval is that
    of the difference (narrower than the two intervals side by side when they move together).
    Each mean counts its own non-NaN images, as the competition metric does."""
    if len(values) != len(reference):
        raise ValueError(f"paired scorings of different lengths: {len(values)} and "
                         f"{len(reference)} images")
    ones, weights = np.ones((1, len(values))), counts.astype(np.float64)
    point = (_means(values, ones) - _means(reference, ones))[0]
    return _interval(float(point), _means(values, weights) - _means(reference, weights),
                     confidence)


def proportion_interval(successes: np.ndarray, eligible: np.ndarray, counts: np.ndarray,
                        confidence: float = 0.95) -> dict:
    """Share of ``eligible`` images that are ``successes`` (sensitivity: positives found)."""
    successes = np.asarray(successes, dtype=bool) & np.asarray(eligible, dtype=bool)
    eligible = np.asarray(eligible, dtype=np.float64)
    point = float(successes.sum() / eligible.sum()) if eligible.sum() else float("nan")
    weights = counts.astype(np.float64)
    return _interval(point, _ratio(weights @ successes, weights @ eligible), confidence)


def roc_auc_interval(targets: np.ndarray, probabilities: np.ndarray, counts: np.ndarray,
                     confidence: float = 0.95) -> dict:
    """ROC AUC (Mann-Whitney, ties counted half) with its interval: per resample, the
    weighted share of positive-negative pairs that the probabilities order correctly."""
    targets = np.asarray(targets, dtype=bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(probabilities, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(probabilities[order]) != 0])

    def auc(weights: np.ndarray) -> np.ndarray:
        sorted_weights = weights[:, order]
        positives = np.add.reduceat(sorted_weights * targets[order], starts, axis=1)
        negatives = np.add.reduceat(sorted_weights * ~targets[order], starts, axis=1)
        below = np.cumsum(negatives, axis=1) - negatives
        pairs = positives.sum(axis=1) * negatives.sum(axis=1)
        return _ratio((positives * (below + negatives / 2)).sum(axis=1), pairs)

    if len(targets) == 0:
        return _interval(float("nan"), np.array([]), confidence)
    point = float(auc(np.ones((1, len(targets))))[0])
    return _interval(point, auc(counts.astype(np.float64)), confidence)


COCO_IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def coco_ap_interval(ground_truth: list, predictions: list, scores: list, counts: np.ndarray,
                     confidence: float = 0.95, max_detections: int = 100,
                     chunk: int = 50) -> dict:
    """COCO box AP (IoU 0.50:0.95, 101 recall points, at most 100 boxes per image) with its
    interval. Matching is per image, so it is done once (the competition metric's greedy
    matching with IoU >= t, as pycocotools); each resample then only re-weights every box
    by how often its image was drawn. Resamples are processed ``chunk`` at a time."""
    from pneumonia_kedro.metrics import prefix_true_positives

    tp, n_truth, ordered = prefix_true_positives(ground_truth, predictions, scores,
                                                 inclusive=True,
                                                 thresholds=COCO_IOU_THRESHOLDS)
    ordered, tp = ordered[:, :max_detections], tp[:, : max_detections + 1]
    hits = np.diff(tp, axis=1).astype(np.float64)  # (N, P, T): box p of image n matched
    image_of, position = np.nonzero(np.isfinite(ordered))
    order = np.argsort(-ordered[image_of, position], kind="stable")
    image_of, hits = image_of[order], hits[image_of[order], position[order]]  # (D,), (D, T)

    def ap(weights: np.ndarray) -> np.ndarray:
        positives = weights @ n_truth  # (R,)
        box_weights = weights[:, image_of]  # (R, D)
        per_threshold = []
        for t in range(hits.shape[1]):
            true_positives = np.cumsum(box_weights * hits[:, t], axis=1)
            false_positives = np.cumsum(box_weights * (1 - hits[:, t]), axis=1)
            recall = true_positives / np.maximum(positives, 1e-12)[:, None]
            precision = true_positives / np.maximum(true_positives + false_positives, 1e-12)
            # The precision envelope (best precision at this recall or beyond), read at 101
            # recall points; points beyond the last recall reached count as 0.
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            values = np.zeros((len(weights), len(_RECALL_POINTS)))
            for r in range(len(weights)):
                index = np.searchsorted(recall[r], _RECALL_POINTS, side="left")
                inside = index < recall.shape[1]
                values[r, inside] = envelope[r, index[inside]]
            per_threshold.append(values.mean(axis=1))
        result = np.mean(per_threshold, axis=0)
        result[positives == 0] = np.nan
        return result

    if len(image_of) == 0:
        point = 0.0 if n_truth.sum() else float("nan")
        return _interval(point, np.full(len(counts), point), confidence)
    point = float(ap(np.ones((1, len(n_truth))))[0])
    weights = counts.astype(np.float64)
    estimates = np.concatenate([ap(weights[i:i + chunk]) for i in range(0, len(weights), chunk)])
    return _interval(point, estimates, confidence)
