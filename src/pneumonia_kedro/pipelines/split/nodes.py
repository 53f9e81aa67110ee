"""Nodes of the split pipeline."""

from __future__ import annotations

import pandas as pd

from pneumonia_kedro.config import from_params
from pneumonia_kedro.split import SplitConfig, describe_split, split_patients


def split(patients: pd.DataFrame, params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Sample patients per Target and split them into train and validation, stratified."""
    config = from_params(SplitConfig, params, "split")
    train, validation = split_patients(patients, config)
    return train, validation, describe_split(train, validation)
