"""Property-based tests: no labels table makes validation fail with anything but LabelsError,
and what passes validation keeps every box inside the image."""

from __future__ import annotations

from unittest import mock

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pneumonia_kedro import text_columns
from pneumonia_kedro.errors import LabelsError
from pneumonia_kedro.labels import (
    LABEL_COLUMNS,
    build_patient_table,
    patient_targets,
    validate_labels,
)

cells = st.one_of(
    st.just(""),
    st.sampled_from(["0", "1", "2", "-1", "nan", "inf", "1e3", " 5 ", "x", "1e999", "-1e999",
                     "1e308", ".5", "+3"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-2000, 2000).map(str), st.text(max_size=8),
)
ids = st.one_of(st.sampled_from(["p1", "p2", "p3"]), st.text(max_size=12))
rows = st.lists(st.tuples(ids, cells, cells, cells, cells, cells), min_size=0, max_size=12)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows)
def test_validation_raises_only_its_own_error_and_accepted_boxes_lie_inside(rows):
    table = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    try:
        labels, _ = validate_labels(table, "fuzz.csv")
    except LabelsError as error:
        assert str(error).startswith("fuzz.csv:")
        return
    boxes = labels.loc[labels["Target"] == 1]
    assert (boxes["width"] > 0).all() and (boxes["height"] > 0).all()
    assert (boxes["x"] >= 0).all() and (boxes["x"] + boxes["width"] <= 1024).all()
    assert (boxes["y"] >= 0).all() and (boxes["y"] + boxes["height"] <= 1024).all()
    assert set(labels.loc[labels["Target"] == 0, "x"].dropna()) == set()
    patients = build_patient_table(labels, pd.Series("Normal", index=labels["patientId"]
                                                     .unique()))
    assert patients["patientId"].is_unique
    assert int(patients["n_boxes"].sum()) == len(boxes)


def outcome(table: pd.DataFrame) -> tuple:
    try:
        labels, _ = validate_labels(table, "fuzz.csv")
    except LabelsError as error:
        return (str(error),)
    targets, patient_of_row = patient_targets(labels)
    return labels, targets, patient_of_row.tolist()


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows)
def test_ids_hashed_in_parts_give_the_same_outcome(rows):
    # Millions of ids are hashed in parts by their last character; with a part size of one id
    # every table here takes that path.
    table = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    whole = outcome(table)
    with mock.patch.object(text_columns, "ONE_HASH_TABLE", 1):
        parts = outcome(table)
    assert len(parts) == len(whole)
    if len(whole) == 1:
        assert parts == whole
    else:
        pd.testing.assert_frame_equal(parts[0], whole[0])
        pd.testing.assert_series_equal(parts[1], whole[1])
        assert parts[2] == whole[2]
