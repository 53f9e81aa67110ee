"""One image (byte-identical pixel data) labelled positive under one patientId and negative
under another: warned on the console, or left out, or refused (``ingest.on_conflicting_
duplicates``); it was trained on, recorded only in ingest_report.json."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.errors import MissingDataError
from pneumonia_kedro.pipelines.ingest.nodes import IngestConfig, conflicting_duplicates


@pytest.fixture
def table() -> pd.DataFrame:
    """a = b (same image, Target 1 and 0), c = d (same image, same label), e alone."""
    return pd.DataFrame({"patientId": ["a", "b", "c", "d", "e"],
                         "Target": [1, 0, 1, 1, 0],
                         "pixel_hash": ["h1", "h1", "h2", "h2", "h3"]})


def test_conflicting_labels_of_one_image_are_warned_on_the_console_by_default(table, caplog):
    policy = from_params(IngestConfig, {}, "ingest").on_conflicting_duplicates
    with caplog.at_level(logging.WARNING, logger="pneumonia_kedro"):
        kept, dropped = conflicting_duplicates(table, policy)
    assert policy == "warn" and dropped == [] and kept["patientId"].tolist() == list("abcde")
    assert "1 image(s) appear under several patientIds with different labels (Target 0 and " \
           "1): a = b" in caplog.text
    assert "ingest.on_conflicting_duplicates: drop" in caplog.text


def test_drop_leaves_out_the_whole_group_and_only_it(table, caplog):
    with caplog.at_level(logging.WARNING, logger="pneumonia_kedro"):
        kept, dropped = conflicting_duplicates(table, "drop")
    assert dropped == ["a", "b"]
    assert kept["patientId"].tolist() == ["c", "d", "e"]  # same label twice: kept
    assert "Leaving out their 2 patients" in caplog.text


def test_error_stops_naming_the_patients_and_the_setting(table):
    with pytest.raises(MissingDataError, match="a = b. Correct the labels, or set "
                                               "ingest.on_conflicting_duplicates: drop"):
        conflicting_duplicates(table, "error")


def test_no_conflict_says_nothing(table, caplog):
    agreeing = table.assign(Target=[1, 1, 1, 1, 0])
    with caplog.at_level(logging.WARNING, logger="pneumonia_kedro"):
        kept, dropped = conflicting_duplicates(agreeing, "drop")
    assert dropped == [] and len(kept) == 5 and caplog.text == ""


def test_an_unknown_policy_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="allowed values: 'warn', 'drop', 'error'"):
        from_params(IngestConfig, {"on_conflicting_duplicates": "keep"}, "ingest")
