"""Property-based tests of box conversion, the letterbox mapping and PredictionStrings: no input
makes them fail with anything but the project's own errors, and every round trip holds.

Where the code may refuse an input, valid inputs are drawn beside arbitrary ones and the test
checks that a fair share of each was drawn: a test whose every input is refused tests nothing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumonia_kedro.boxes import Letterbox, as_boxes, xywh_to_xyxy, xyxy_to_xywh
from pneumonia_kedro.errors import BoxError
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.submission import (
    SubmissionError,
    format_prediction_string,
)
from tests.submission_format import parse_prediction_string

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(),
              st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=6), max_leaves=30,
)
box_lists = st.lists(st.tuples(finite, finite, finite, finite), max_size=8)
sizes = st.integers(1, 4096)


box_like = st.one_of(
    st.lists(st.lists(st.one_of(finite, st.integers(-10**6, 10**6)), min_size=4, max_size=4),
             max_size=6),
    st.lists(finite, min_size=4, max_size=4),
)

# Rows of the wrong length, ragged rows, NaN and infinite values.
not_box_like = st.lists(st.lists(st.floats(), min_size=1, max_size=6), min_size=1, max_size=4)


def assert_fair_share(outcomes: Counter) -> None:
    """At least a quarter of the drawn inputs accepted, and a tenth refused."""
    total = sum(outcomes.values())
    assert outcomes["accepted"] >= 0.25 * total, outcomes
    assert outcomes["refused"] >= 0.1 * total, outcomes


def test_anything_becomes_finite_boxes_or_a_box_error():
    outcomes: Counter[str] = Counter()

    @settings(database=None)
    @given(value=st.one_of(box_like, anything, not_box_like))
    def run(value: object) -> None:
        try:
            boxes = as_boxes(value)
        except BoxError:
            outcomes["refused"] += 1
            return
        outcomes["accepted"] += 1
        assert boxes.dtype == np.float64 and boxes.ndim == 2 and boxes.shape[1] == 4
        assert np.isfinite(boxes).all()
        np.testing.assert_array_equal(boxes.reshape(-1), np.asarray(value, float).reshape(-1))

    run()
    assert_fair_share(outcomes)


@given(boxes=box_lists)
def test_xywh_and_xyxy_round_trip(boxes):
    xyxy = xywh_to_xyxy(boxes)
    np.testing.assert_allclose(xyxy_to_xywh(xyxy), as_boxes(boxes), rtol=1e-12, atol=1e-6)
    np.testing.assert_allclose(xyxy[:, 2:] - xyxy[:, :2], as_boxes(boxes)[:, 2:], atol=1e-6)


@given(height=sizes, width=sizes, size=sizes)
def test_letterbox_puts_the_whole_image_inside_the_square(height, width, size):
    letterbox = Letterbox.fit(height, width, size)
    assert letterbox.offset_x >= 0 and letterbox.offset_y >= 0
    assert letterbox.offset_x + letterbox.resized_width <= size
    assert letterbox.offset_y + letterbox.resized_height <= size
    assert size in (letterbox.resized_width, letterbox.resized_height) or \
        min(letterbox.resized_width, letterbox.resized_height) == 1
    whole = letterbox.to_cache([[0, 0, width, height]])[0]
    np.testing.assert_allclose(whole, [letterbox.offset_x, letterbox.offset_y,
                                       letterbox.offset_x + letterbox.resized_width,
                                       letterbox.offset_y + letterbox.resized_height])
    assert ImageCache.letterbox_from_record(letterbox.as_dict()) == letterbox


@given(height=sizes, width=sizes, size=sizes, boxes=box_lists)
def test_cache_and_original_coordinates_round_trip(height, width, size, boxes):
    letterbox = Letterbox.fit(height, width, size)
    original = xywh_to_xyxy(boxes)
    back = letterbox.to_original(letterbox.to_cache(original), clip=False)
    np.testing.assert_allclose(back, original, rtol=1e-9, atol=1e-6)


@given(height=sizes, width=sizes, size=sizes, boxes=box_lists)
def test_any_predicted_box_maps_back_inside_the_original_image(height, width, size, boxes):
    letterbox = Letterbox.fit(height, width, size)
    mapped = letterbox.to_original(boxes)
    assert (mapped[:, [0, 2]] >= 0).all() and (mapped[:, [0, 2]] <= width).all()
    assert (mapped[:, [1, 3]] >= 0).all() and (mapped[:, [1, 3]] <= height).all()


@given(height=st.integers(-5, 0), width=sizes, size=sizes)
def test_an_empty_image_size_is_a_box_error(height, width, size):
    with pytest.raises(BoxError, match="sizes must be positive"):
        Letterbox.fit(height, width, size)


@given(boxes=st.lists(st.tuples(st.floats(0, 1000), st.floats(0, 1000), st.floats(0, 1000),
                                st.floats(0, 1000)), max_size=6),
       data=st.data())
def test_prediction_strings_round_trip_to_the_written_precision(boxes, data):
    scores = data.draw(st.lists(st.floats(0, 1), min_size=len(boxes), max_size=len(boxes)))
    text = format_prediction_string(as_boxes(boxes), scores)
    parsed_boxes, parsed_scores = parse_prediction_string(text)
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    np.testing.assert_allclose(parsed_scores, np.asarray(scores)[order], atol=5e-5)
    np.testing.assert_allclose(parsed_boxes, as_boxes(boxes)[order], atol=0.05 + 1e-9)


prediction_strings = st.lists(
    st.tuples(st.floats(0, 1), *[st.floats(0, 1024)] * 4), max_size=4,
).map(lambda groups: " ".join(f"{value:.4f}" for group in groups for value in group))


def test_any_prediction_string_parses_or_gets_a_submission_error():
    outcomes: Counter[str] = Counter()

    @settings(database=None)
    @given(text=st.one_of(prediction_strings, st.text(max_size=40),
                          st.lists(st.sampled_from(["0.5", "1", "nan", "inf", "-2", "x",
                                                    "1e400"]), max_size=12).map(" ".join)))
    def run(text: str) -> None:
        try:
            boxes, scores = parse_prediction_string(text, "row 3")
        except SubmissionError as error:
            outcomes["refused"] += 1
            assert str(error).startswith("row 3: ")
            return
        outcomes["accepted"] += 1
        assert boxes.shape == (len(scores), 4) and np.isfinite(boxes).all()
        values = np.asarray(text.split(), dtype=float).reshape(-1, 5)
        np.testing.assert_array_equal(scores, values[:, 0])
        np.testing.assert_array_equal(boxes, values[:, 1:])

    run()
    assert_fair_share(outcomes)
