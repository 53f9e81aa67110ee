"""The competition metric (golden cases and a slow reference), COCO AP, FROC, image level."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia_kedro.boxes import xywh_to_xyxy
from pneumonia_kedro.metrics import (
    best_threshold,
    coco_metrics,
    competition_metric,
    competition_scores,
    froc,
    image_level_metrics,
    threshold_curve,
)
from tests.metric_reference import image_score_reference


def xyxy(*boxes):
    return xywh_to_xyxy(np.array(boxes, dtype=float))


def test_published_golden_case_scores_three_quarters():
    # IoU 2/3: hits at 0.40..0.65, misses at 0.70 and 0.75 -> 6/8.
    score = competition_scores([xyxy([100, 100, 200, 200])], [xyxy([100, 100, 300, 200])],
                               [[0.9]])
    assert score[0] == pytest.approx(0.75)


def test_empty_images_are_left_out_and_false_alarms_cost_a_whole_image():
    truth = [xyxy([100, 100, 200, 200]), np.zeros((0, 4)), np.zeros((0, 4))]
    predictions = [xyxy([100, 100, 200, 200]), np.zeros((0, 4)), xyxy([10, 10, 50, 50])]
    scores = competition_scores(truth, predictions, [[0.9], [], [0.3]])
    assert scores[0] == 1.0 and np.isnan(scores[1]) and scores[2] == 0.0
    assert competition_metric(truth, predictions, [[0.9], [], [0.3]]) == pytest.approx(0.5)


def test_a_missed_positive_scores_zero():
    assert competition_scores([xyxy([1, 1, 50, 50])], [np.zeros((0, 4))], [[]])[0] == 0.0


def test_confidence_order_decides_which_prediction_takes_the_box():
    # Two overlapping truths; each prediction takes the unmatched truth it overlaps most.
    truth = [xyxy([0, 0, 100, 100], [0, 0, 100, 150])]
    exact, taller = [0, 0, 100, 100], [0, 0, 100, 120]
    # exact first takes A (IoU 1), taller then takes B (IoU 0.8): both hit at every t.
    assert competition_scores(truth, [xyxy(exact, taller)], [[0.9, 0.5]])[0] == 1.0
    # taller first takes A (IoU 0.83); exact is left B (IoU 0.67): misses at 0.70 and 0.75.
    assert competition_scores(truth, [xyxy(exact, taller)], [[0.5, 0.9]])[0] == \
        pytest.approx((6 * 1.0 + 2 * (1 / 3)) / 8)


def test_inclusive_threshold_counts_iou_equal_to_t():
    # IoU exactly 0.5: "greater than" misses at t = 0.5, ">=" hits.
    truth, prediction = [xyxy([0, 0, 100, 100])], [xyxy([0, 0, 200, 100])]
    strict = competition_scores(truth, prediction, [[1.0]])[0]
    inclusive = competition_scores(truth, prediction, [[1.0]], inclusive=True)[0]
    assert strict == pytest.approx(2 / 8) and inclusive == pytest.approx(3 / 8)


def test_vectorised_metric_equals_slow_loops_on_random_images():
    rng = np.random.default_rng(0)
    truth, predictions, scores = [], [], []
    for _ in range(300):
        n_truth, n_pred = rng.integers(0, 4), rng.integers(0, 6)
        centre = rng.uniform(100, 900, size=2)
        truth.append(xyxy(*[[*(centre + rng.normal(0, 40, 2)), *rng.uniform(60, 250, 2)]
                            for _ in range(n_truth)]) if n_truth else np.zeros((0, 4)))
        predictions.append(xyxy(*[[*(centre + rng.normal(0, 40, 2)), *rng.uniform(60, 250, 2)]
                                  for _ in range(n_pred)]) if n_pred else np.zeros((0, 4)))
        scores.append(rng.random(n_pred))
    fast = competition_scores(truth, predictions, scores)
    for inclusive in (False, True):
        fast = competition_scores(truth, predictions, scores, inclusive)
        for i in range(300):
            slow = image_score_reference(truth[i], predictions[i], scores[i], inclusive)
            if slow is None:
                assert np.isnan(fast[i])
            else:
                assert fast[i] == pytest.approx(slow)


def test_threshold_tuning_picks_the_best_grid_value():
    truth = [xyxy([100, 100, 200, 200]), np.zeros((0, 4))]
    predictions = [xyxy([100, 100, 200, 200]), xyxy([500, 500, 100, 100])]
    scores = [[0.8], [0.4]]
    curve = threshold_curve(truth, predictions, scores, [0.3, 0.5, 0.9])
    assert curve == [(0.3, 0.5), (0.5, 1.0), (0.9, 0.0)]
    assert best_threshold(curve) == (0.5, 1.0)


def test_coco_ap_on_a_hand_computable_case():
    # Two images with one box each; one exact hit (score 0.9) and one false alarm (0.8) on a
    # negative image, one miss: precision 1 at recall 0.5 -> AP 0.5 at every IoU threshold.
    truth = [xyxy([10, 10, 50, 50]), xyxy([200, 200, 60, 60]), np.zeros((0, 4))]
    predictions = [xyxy([10, 10, 50, 50]), np.zeros((0, 4)), xyxy([5, 5, 20, 20])]
    result = coco_metrics(truth, predictions, [[0.9], [], [0.8]])
    assert result["coco_ap"] == pytest.approx(0.5, abs=0.01)
    assert result["coco_ap50"] == pytest.approx(0.5, abs=0.01)
    assert result["coco_ar100"] == pytest.approx(0.5, abs=0.01)


def test_froc_counts_lesions_found_per_false_positive_rate():
    truth = [xyxy([10, 10, 50, 50]), xyxy([100, 100, 50, 50]), np.zeros((0, 4))]
    predictions = [xyxy([10, 10, 50, 50]), xyxy([400, 400, 20, 20], [100, 100, 50, 50]),
                   xyxy([1, 1, 5, 5])]
    result = froc(truth, predictions, [[0.9], [0.8, 0.3], [0.5]], rates=(0.25, 0.5, 1.0))
    # Order: hit .9, FP .8, FP .5, hit .3 -> 1 hit at 1/3 FP/image, 2 hits at 2/3.
    assert result["sensitivity_at_fp_per_image"] == {"0.25": 0.5, "0.5": 0.5, "1.0": 1.0}


def test_image_level_metrics_from_top_box_scores():
    result = image_level_metrics([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1], threshold=0.5)
    assert result["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}
    assert result["sensitivity"] == 0.5 and result["specificity"] == 0.5
    assert result["roc_auc"] == pytest.approx(0.75)


def test_validation_without_truth_boxes_or_predictions_reports_an_undefined_metric():
    """Only negatives and no box anywhere: no image counts, the metric is undefined (None),
    and neither the evaluation nor the report fails on it."""
    import pandas as pd

    from pneumonia_kedro.pipelines.evaluate.nodes import evaluate
    from pneumonia_kedro.pipelines.report.nodes import write_report

    patients = pd.DataFrame({"patientId": ["a", "b"], "Target": [0, 0], "boxes": [[], []],
                             "view_position": ["AP", "PA"],
                             "detailed_class": ["Normal", "Normal"]})
    no_boxes = pd.DataFrame(columns=["patientId", "x", "y", "width", "height", "score"])
    postprocessing = {"score_threshold": 0.5, "nms_iou": 0.1, "max_boxes": 4, "shrink": 1.0}
    probabilities = pd.DataFrame({"patientId": ["a", "b"], "probability": [0.2, 0.1]})
    metrics, headline, _ = evaluate(no_boxes, patients, probabilities, postprocessing,
                                    {"progress": False})
    assert metrics["overall"]["competition_metric"] is None
    assert "competition_metric" not in headline and headline["specificity"]["value"] == 1.0
    report = write_report(
        metrics, {"validation": {"patients": 2, "positive": 0}, "train": {"patients": 8}},
        {"image_size": 64},
        pd.DataFrame({"epoch": [1], "validation_competition_metric": [0.0]}))
    assert "| competition metric (mean over IoU 0.40-0.75) | n/a |" in report


def test_postprocess_equals_per_image_nms_and_top_boxes():
    """The one batched NMS call gives what NMS image by image gave (the former loop)."""
    import pandas as pd
    import torch
    from torchvision.ops import nms

    from pneumonia_kedro.postprocess import PostprocessConfig, postprocess

    rng = np.random.default_rng(4)
    n = 400
    predictions = pd.DataFrame({
        "patientId": rng.choice([f"p{i}" for i in range(25)], n),
        "x": rng.uniform(0, 800, n), "y": rng.uniform(0, 800, n),
        "width": rng.uniform(20, 300, n), "height": rng.uniform(20, 300, n),
        "score": rng.uniform(0, 1, n)})
    config = PostprocessConfig(score_threshold=0.3, nms_iou=0.3, max_boxes=3, shrink=0.875)
    expected = []
    for _, rows in predictions.groupby("patientId", sort=True):
        keep = nms(torch.as_tensor(xyxy(*rows[["x", "y", "width", "height"]].to_numpy())),
                   torch.tensor(rows["score"].to_numpy()), 0.3).numpy()[:3]
        expected.append(rows.iloc[keep])
    expected = pd.concat(expected, ignore_index=True)
    centre_x = expected["x"] + expected["width"] / 2
    expected["width"] *= 0.875
    expected["x"] = centre_x - expected["width"] / 2
    result = postprocess(predictions, config, apply_threshold=False)
    pd.testing.assert_frame_equal(result[["patientId", "x", "width", "score"]],
                                  expected[["patientId", "x", "width", "score"]])
    strict = PostprocessConfig(score_threshold=0.9, nms_iou=0.3, max_boxes=3, shrink=0.875)
    thresholded = postprocess(predictions, strict)
    assert (thresholded["score"] >= 0.9).all() and 0 < len(thresholded) < len(result)


def test_threshold_curve_equals_the_metric_at_each_threshold():
    """One matching pass for the whole curve gives what scoring each threshold alone gives."""
    from pneumonia_kedro.metrics import competition_metric, threshold_curve

    rng = np.random.default_rng(11)
    truth, boxes, scores = [], [], []
    for i in range(60):
        truth.append(xywh_to_xyxy(rng.uniform([0, 0, 50, 50], [500, 500, 300, 300], (i % 3, 4))))
        boxes.append(xywh_to_xyxy(rng.uniform([0, 0, 50, 50], [500, 500, 300, 300], (i % 5, 4))))
        scores.append(np.round(rng.uniform(0, 1, i % 5), 1))  # ties with the grid
    grid = np.round(np.arange(0.0, 1.01, 0.1), 2)
    for threshold, metric in threshold_curve(truth, boxes, scores, grid):
        keep = [s >= threshold for s in scores]
        expected = competition_metric(truth, [b[k] for b, k in zip(boxes, keep, strict=True)],
                                      [s[k] for s, k in zip(scores, keep, strict=True)])
        assert metric == pytest.approx(expected, abs=1e-12)
