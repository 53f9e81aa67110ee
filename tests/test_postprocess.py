"""Post-processing of prediction tables: NMS within each image, the cap on boxes, the shrink,
the classifier's gate, the score threshold and the delivered boxes' label shift."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pneumonia_kedro.postprocess import (
    PREDICTION_COLUMNS,
    GatingConfig,
    PostprocessConfig,
    image_probabilities,
    per_image,
    postprocess,
    predictions_table,
    shrink_boxes,
)


def _table() -> pd.DataFrame:
    """Image a: two boxes overlapping by IoU 1/3 and a third apart; image b: one box at the
    same place as a's best (boxes of different images never suppress each other)."""
    rows = [("a", 100.0, 100.0, 200.0, 100.0, 0.9),
            ("a", 200.0, 100.0, 200.0, 100.0, 0.6),  # IoU with the first: 100/300
            ("a", 600.0, 600.0, 50.0, 80.0, 0.3),
            ("b", 100.0, 100.0, 200.0, 100.0, 0.5)]
    return pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS)).assign(variant=0)


def _config(**values: object) -> PostprocessConfig:
    return PostprocessConfig(**{"score_threshold": 0.0, "nms_iou": 0.5, "max_boxes": 4,
                                **values})


def test_nms_suppresses_overlaps_within_an_image_only():
    kept = postprocess(_table(), _config(nms_iou=0.5))
    assert kept["score"].tolist() == [0.9, 0.6, 0.3, 0.5]
    suppressed = postprocess(_table(), _config(nms_iou=0.3))
    assert suppressed["patientId"].tolist() == ["a", "a", "b"]
    assert suppressed["score"].tolist() == [0.9, 0.3, 0.5]
    assert list(suppressed.columns) == list(PREDICTION_COLUMNS)  # variant dropped


def test_the_cap_keeps_each_image_s_best_boxes():
    shuffled = _table().iloc[[2, 3, 1, 0]]
    capped = postprocess(shuffled, _config(max_boxes=2))
    assert capped["patientId"].tolist() == ["a", "a", "b"]
    assert capped["score"].tolist() == [0.9, 0.6, 0.5]


def test_shrink_scales_boxes_about_their_centres():
    table = _table().iloc[:1]
    shrunk = shrink_boxes(table, 0.5)
    assert shrunk[["x", "y", "width", "height"]].values.tolist() == [[150.0, 125.0, 100.0,
                                                                        50.0]]
    assert shrink_boxes(table, 1.0) is table
    assert postprocess(table, _config(shrink=0.5))[["x", "width"]].values.tolist() == [
        [150.0, 100.0]]


def test_the_threshold_applies_to_gated_scores():
    probabilities = pd.Series({"a": 0.5, "b": 1.0})
    product = _config(score_threshold=0.4, gating=GatingConfig("product"))
    gated = postprocess(_table(), product, probabilities=probabilities)
    # a: 0.9 -> 0.45 kept, 0.6 -> 0.3 and 0.3 -> 0.15 dropped; b: 0.5 kept.
    assert gated["patientId"].tolist() == ["a", "b"]
    np.testing.assert_allclose(gated["score"], [0.45, 0.5])
    candidates = postprocess(_table(), product, apply_threshold=False,
                             probabilities=probabilities)
    np.testing.assert_allclose(candidates["score"], [0.45, 0.3, 0.15, 0.5])
    dropped = postprocess(_table(), _config(gating=GatingConfig("drop_below", 0.8)),
                          probabilities=probabilities)
    assert dropped["patientId"].tolist() == ["b"]
    with pytest.raises(ValueError, match="no image-level probability for b"):
        postprocess(_table(), product, probabilities=probabilities.drop("b"))


def test_label_shift_scales_only_delivered_boxes_after_the_shrink():
    table = _table().iloc[:1]
    config = _config(shrink=0.8, label_shift=0.5)
    evaluated = postprocess(table, config)
    delivered = postprocess(table, config, apply_label_shift=True)
    assert evaluated["width"].tolist() == [pytest.approx(160.0)]
    assert delivered["width"].tolist() == [pytest.approx(80.0)]
    assert delivered["height"].tolist() == [pytest.approx(40.0)]
    np.testing.assert_allclose(delivered["x"] + delivered["width"] / 2, [200.0])
    np.testing.assert_allclose(delivered["y"] + delivered["height"] / 2, [150.0])


def test_image_probability_is_the_best_score_and_zero_without_a_box():
    assert image_probabilities(_table(), ["b", "a", "c"]).tolist() == [0.5, 0.9, 0.0]


def test_tables_per_image_and_back():
    boxes, scores = per_image(_table(), ["b", "c", "a"])
    np.testing.assert_array_equal(boxes[0], [[100.0, 100.0, 300.0, 200.0]])
    assert boxes[1].shape == (0, 4) and scores[1].shape == (0,)
    assert scores[2].tolist() == [0.9, 0.6, 0.3]
    table = predictions_table(["x", "y"], [np.array([[1.0, 2.0, 3.0, 4.0]]), np.zeros((0, 4))],
                              [np.array([0.7]), np.zeros(0)])
    assert table.values.tolist() == [["x", 1.0, 2.0, 3.0, 4.0, 0.7]]
    empty = postprocess(predictions_table([], [], []), _config())
    assert empty.empty and list(empty.columns) == list(PREDICTION_COLUMNS)
    assert empty["x"].dtype == np.float64
