"""Nodes of the cross_validation pipeline."""

from __future__ import annotations

import logging

import pandas as pd

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.split import SplitConfig, assign_folds, fold_name, fold_patients

logger = logging.getLogger(__name__)


def assign_patient_folds(train_patients: pd.DataFrame, params: dict) -> pd.DataFrame:
    """The training patients with the ``fold`` whose validation part each one is in."""
    config = from_params(SplitConfig, params, "split")
    if config.folds < 2:
        raise ConfigError("the cross_validation pipeline needs params:split.folds of 2 or "
                          f"more, got {config.folds} (1: use the train, classify and evaluate "
                          "pipelines)")
    folds = assign_folds(train_patients, config.folds, config.stratify_by_view, config.seed)
    table = train_patients.merge(folds, on="patientId", how="left", validate="one_to_one")
    sizes = table.groupby("fold")["Target"].agg(["size", "sum"])
    logger.info("%d folds of the %d training patients: %s", config.folds, len(table),
                ", ".join(f"{fold_name(i)}: {int(r['size'])} ({int(r['sum'])} with opacity)"
                          for i, r in sizes.iterrows()))
    return table


def select_fold(patient_folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The patients fold ``fold`` trains on (every other fold) and validates on (its own)."""
    return fold_patients(patient_folds.drop(columns="fold"), patient_folds, fold)


def collect_out_of_fold(*fold_tables: pd.DataFrame) -> pd.DataFrame:
    """One table of every fold's predictions on its own validation patients: each training
    patient once, predicted by the one model that never saw it."""
    table = pd.concat(fold_tables, ignore_index=True)
    if "probability" in table and table["patientId"].duplicated().any():
        raise ValueError("a patient is in more than one fold's validation part")
    return table


def collect_histories(*histories: pd.DataFrame) -> pd.DataFrame:
    """Every fold's per-epoch training history, with its ``fold``."""
    return pd.concat([history.assign(fold=fold_name(i)) for i, history in enumerate(histories)],
                     ignore_index=True)


def cross_validation_metrics(out_of_fold_metrics: dict, ensemble_validation_metrics: dict,
                             patient_folds: pd.DataFrame) -> dict:
    """The out-of-fold metrics (what the report leads with; post-processing tuned on them),
    with the fold ensemble's on the validation split (post-processing as tuned out of fold)."""
    folds = patient_folds.groupby("fold")
    return {**out_of_fold_metrics,
            "cross_validation": {
                "folds": int(patient_folds["fold"].nunique()),
                "patients_per_fold": {fold_name(i): int(len(g)) for i, g in folds},
                "training_patients": len(patient_folds),
            },
            "validation_ensemble": ensemble_validation_metrics}
