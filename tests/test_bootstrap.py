"""Bootstrap intervals over patients: right point, coverage, narrowing, speed of the method."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumonia_kedro.bootstrap import (
    BootstrapConfig,
    mean_difference_interval,
    mean_interval,
    proportion_interval,
    resample_counts,
    roc_auc_interval,
)


def _scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.random(n) < 0.3
    probabilities = np.round(np.clip(rng.normal(0.35 + 0.3 * targets, 0.2), 0, 1), 2)  # ties
    per_image = np.where(rng.random(n) < 0.4, np.nan, rng.random(n))
    return targets, probabilities, per_image


def test_each_resample_draws_as_many_images_as_there_are():
    counts = resample_counts(50, BootstrapConfig(resamples=200, seed=3))
    assert counts.shape == (200, 50) and (counts.sum(axis=1) == 50).all()
    np.testing.assert_array_equal(counts, resample_counts(50, BootstrapConfig(resamples=200,
                                                                               seed=3)))


def test_points_equal_the_plain_metrics_and_intervals_cover_them():
    targets, probabilities, per_image = _scores(400)
    counts = resample_counts(400, BootstrapConfig(resamples=500))
    auc = roc_auc_interval(targets, probabilities, counts)
    assert auc["value"] == roc_auc_score(targets, probabilities)
    mean = mean_interval(per_image, counts)
    assert mean["value"] == np.nanmean(per_image)
    found = probabilities >= 0.5
    sensitivity = proportion_interval(found, targets, counts)
    assert sensitivity["value"] == found[targets].mean()
    for interval in (auc, mean, sensitivity):
        assert interval["low"] < interval["value"] < interval["high"]


def test_weighted_auc_of_a_resample_equals_sklearn_on_the_drawn_images():
    targets, probabilities, _ = _scores(120, seed=1)
    counts = resample_counts(120, BootstrapConfig(resamples=1, seed=5))
    drawn = np.repeat(np.arange(120), counts[0])
    expected = roc_auc_score(targets[drawn], probabilities[drawn])
    # A one-resample "interval" is that resample's value.
    assert np.isclose(roc_auc_interval(targets, probabilities, counts)["low"], expected)


def test_intervals_narrow_with_more_images():
    widths = []
    for n in (200, 3200):
        targets, probabilities, per_image = _scores(n, seed=2)
        counts = resample_counts(n, BootstrapConfig(resamples=400))
        for interval in (roc_auc_interval(targets, probabilities, counts),
                         mean_interval(per_image, counts)):
            widths.append(interval["high"] - interval["low"])
    small_auc, small_mean, large_auc, large_mean = widths
    # The width shrinks about as 1 / sqrt(n): 16x the images, about a quarter of the width.
    assert large_auc < small_auc / 2.5 and large_mean < small_mean / 2.5


def test_a_paired_difference_is_the_difference_of_means_with_a_narrower_interval():
    _, _, per_image = _scores(300, seed=4)
    # A second scoring of the same images: slightly better on most, NaN where the first is.
    rng = np.random.default_rng(9)
    better = np.clip(per_image + rng.normal(0.03, 0.02, 300), 0, 1)
    counts = resample_counts(300, BootstrapConfig(resamples=500))
    difference = mean_difference_interval(better, per_image, counts)
    assert np.isclose(difference["value"], np.nanmean(better) - np.nanmean(per_image))
    # Both move together over the resamples: the paired interval excludes 0 although the
    # two intervals side by side overlap.
    first, second = mean_interval(per_image, counts), mean_interval(better, counts)
    assert first["high"] > second["low"]
    assert 0 < difference["low"] < difference["value"] < difference["high"]
    same = mean_difference_interval(per_image, per_image, counts)
    assert same == {"value": 0.0, "low": 0.0, "high": 0.0}
    # Gating drops every box of some negatives: those images stop counting in one scoring.
    gated = np.where(rng.random(300) < 0.2, np.nan, better)
    changed = mean_difference_interval(gated, per_image, counts)
    assert np.isclose(changed["value"], np.nanmean(gated) - np.nanmean(per_image))
    assert np.isfinite(changed["low"]) and changed["low"] < changed["value"] < changed["high"]
    with pytest.raises(ValueError, match="300 and 299 images"):
        mean_difference_interval(per_image, per_image[1:], counts)


def test_undefined_metrics_give_nan_not_an_error():
    counts = resample_counts(5, BootstrapConfig(resamples=20))
    only_negatives = roc_auc_interval(np.zeros(5, bool), np.linspace(0, 1, 5), counts)
    assert np.isnan(only_negatives["value"]) and np.isnan(only_negatives["low"])
    nothing_counts = mean_interval(np.full(5, np.nan), counts)
    assert np.isnan(nothing_counts["value"]) and np.isnan(nothing_counts["high"])
    empty = roc_auc_interval(np.zeros(0, bool), np.zeros(0), resample_counts(0, BootstrapConfig()))
    assert np.isnan(empty["value"])


def test_coco_ap_point_equals_pycocotools_and_its_interval_covers_it():
    from pneumonia_kedro.bootstrap import coco_ap_interval
    from pneumonia_kedro.boxes import xywh_to_xyxy
    from pneumonia_kedro.metrics import coco_metrics

    rng = np.random.default_rng(0)
    truth, boxes, scores = [], [], []
    for i in range(120):
        image_truth = xywh_to_xyxy(rng.uniform([0, 0, 50, 50], [500, 500, 300, 300],
                                               (i % 3, 4)))
        near = image_truth + rng.normal(0, 8, image_truth.shape)  # positive sizes kept
        far = xywh_to_xyxy(rng.uniform([0, 0, 50, 50], [500, 500, 300, 300], (i % 4, 4)))
        truth.append(image_truth)
        boxes.append(np.vstack([near, far]))
        scores.append(rng.uniform(0, 1, len(near) + len(far)))
    counts = resample_counts(120, BootstrapConfig(resamples=300))
    interval = coco_ap_interval(truth, boxes, scores, counts)
    assert interval["value"] == pytest.approx(coco_metrics(truth, boxes, scores)["coco_ap"],
                                              abs=1e-9)
    assert interval["low"] < interval["value"] < interval["high"]
