"""The competition's submission format: confidence order, rounding, one row per patient in
order, the no-box conventions and the check against the sample submission."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pneumonia_kedro.submission import (
    SubmissionError,
    build_submission,
    check_against_sample,
    format_prediction_string,
)


def test_groups_are_written_in_descending_confidence():
    boxes = np.array([[1, 2, 3, 4], [10.04, 20.06, 30, 40], [5, 6, 7, 8]], dtype=float)
    text = format_prediction_string(boxes, [0.2, 0.91234, 0.5])
    assert text == "0.9123 10.0 20.1 30.0 40.0 0.5000 5.0 6.0 7.0 8.0 0.2000 1.0 2.0 3.0 4.0"
    assert format_prediction_string(np.zeros((0, 4)), []) == ""


def test_one_row_per_patient_in_the_given_order():
    predictions = pd.DataFrame({
        "patientId": ["b", "a", "b"], "x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0],
        "width": [10.0, 20.0, 30.0], "height": [10.0, 20.0, 30.0], "score": [0.3, 0.6, 0.9]})
    submission = build_submission(predictions, ["c", "b", "a"])
    assert submission["patientId"].tolist() == ["c", "b", "a"]
    assert submission["PredictionString"].tolist() == [
        "", "0.9000 3.0 3.0 30.0 30.0 0.3000 1.0 1.0 10.0 10.0", "0.6000 2.0 2.0 20.0 20.0"]


def test_the_notebook_convention_boxes_the_whole_image_of_its_own_size():
    empty = pd.DataFrame(columns=["patientId", "x", "y", "width", "height", "score"])
    submission = build_submission(empty, ["square", "wide"], no_box="whole_image",
                                  image_sizes={"wide": (512, 1024)})
    assert submission["PredictionString"].tolist() == [
        "0.0000 0.0 0.0 1024.0 1024.0", "0.0000 0.0 0.0 1024.0 512.0"]


def test_the_sample_submission_must_name_the_same_patients():
    submission = pd.DataFrame({"patientId": ["a", "b"], "PredictionString": ["", ""]})
    assert check_against_sample(submission, pd.DataFrame()) == {"checked_against_sample": False}
    with pytest.raises(SubmissionError, match=r"0 missing .* 1 not in the sample \(e.g. \['b'\]\)"):
        check_against_sample(submission, pd.DataFrame({"patientId": ["a"]}))
