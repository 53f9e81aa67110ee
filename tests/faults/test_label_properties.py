"""Property-based tests: no labels table makes validation fail with anything but LabelsError,
and what passes validation keeps every box inside the image.

Tables are drawn as valid competition rows, some with random cells or ids mixed in, so that
both outcomes occur; the test checks that each does, often enough to mean something."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pneumonia_kedro.errors import LabelsError
from pneumonia_kedro.labels import LABEL_COLUMNS, build_patient_table, validate_labels

cells = st.one_of(
    st.just(""),
    st.sampled_from(["0", "1", "2", "-1", "nan", "inf", "1e3", " 5 ", "x", "1e999", "-1e999",
                     "1e308", ".5", "+3"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-2000, 2000).map(str), st.text(max_size=8),
)
ids = st.one_of(st.sampled_from(["p1", "p2", "p3"]), st.text(max_size=12))
random_rows = st.tuples(ids, cells, cells, cells, cells, cells)
# Valid rows: negatives and positives never share an id, boxes lie inside 1024 x 1024.
coordinate = st.one_of(st.integers(0, 500).map(str), st.floats(0, 500).map("{:.1f}".format))
size = st.one_of(st.integers(1, 500).map(str), st.floats(1, 500).map("{:.1f}".format))
negative_rows = st.integers(0, 5).map(lambda i: (f"n{i}", "", "", "", "", "0"))
positive_rows = st.tuples(st.integers(0, 5).map("p-{}".format), coordinate, coordinate, size,
                          size, st.just("1"))
valid_rows = st.lists(st.one_of(negative_rows, positive_rows), min_size=1, max_size=12)
mixed_rows = st.tuples(valid_rows, st.lists(random_rows, min_size=1, max_size=3)).map(
    lambda drawn: drawn[0] + drawn[1])
# About half the drawn tables valid, the others with random rows mixed in or all random.
all_random_rows = st.lists(random_rows, max_size=12)
tables = st.sampled_from([valid_rows, valid_rows, mixed_rows, all_random_rows]).flatmap(
    lambda kind: kind)


def check_one(rows: list[tuple]) -> str:
    """Validate one table; return whether it was accepted, checking what must hold."""
    table = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    try:
        labels, _ = validate_labels(table, "fuzz.csv")
    except LabelsError as error:
        assert str(error).startswith("fuzz.csv:")
        return "rejected"
    boxes = labels.loc[labels["Target"] == 1]
    assert (boxes["width"] > 0).all() and (boxes["height"] > 0).all()
    assert (boxes["x"] >= 0).all() and (boxes["x"] + boxes["width"] <= 1024).all()
    assert (boxes["y"] >= 0).all() and (boxes["y"] + boxes["height"] <= 1024).all()
    assert set(labels.loc[labels["Target"] == 0, "x"].dropna()) == set()
    assert labels["line"].is_monotonic_increasing and labels["line"].min() >= 2
    patients = build_patient_table(labels, pd.Series("Normal", index=labels["patientId"]
                                                     .unique()))
    assert patients["patientId"].is_unique and patients["patientId"].is_monotonic_increasing
    assert int(patients["n_boxes"].sum()) == len(boxes)
    assert patients["boxes"].map(len).tolist() == patients["n_boxes"].tolist()
    return "accepted"


@pytest.mark.slow
def test_validation_raises_only_its_own_error_and_accepted_boxes_lie_inside():
    outcomes: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(rows=tables)
    def run(rows: list[tuple]) -> None:
        outcomes[check_one(rows)] += 1

    run()
    # Both outcomes occur often: the checks above ran on accepted tables, not on none.
    total = sum(outcomes.values())
    assert outcomes["accepted"] >= 0.3 * total, outcomes
    assert outcomes["rejected"] >= 0.2 * total, outcomes
