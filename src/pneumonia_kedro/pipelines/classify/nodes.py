"""Nodes of the classify pipeline."""

from __future__ import annotations

import pandas as pd

from pneumonia_kedro.classifier import ClassifierConfig, TrainedClassifier, train_classifier
from pneumonia_kedro.config import from_params
from pneumonia_kedro.engines import engine_config
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.training import (
    MlflowEpochLogger,
    checkpoint_store,
    final_metrics,
    history_table,
    training_fingerprint,
)


def _targets(patients: pd.DataFrame) -> pd.Series:
    return patients.set_index("patientId")["Target"].astype(int)


def train_image_classifier(train_image_cache: ImageCache, validation_image_cache: ImageCache,
                           train_patients: pd.DataFrame, validation_patients: pd.DataFrame,
                           params: dict, engine: dict | str | None = None,
                           fold: int | None = None
                           ) -> tuple[TrainedClassifier, pd.DataFrame, dict]:
    """Train the image-level classifier; return the best epoch's, the per-epoch history and
    the final metrics. ``fold``: the cross-validation fold (its checkpoint folder and GPU)."""
    config = from_params(ClassifierConfig, params, "classifier")
    train_targets, validation_targets = _targets(train_patients), _targets(validation_patients)
    fingerprint = training_fingerprint(
        None, config, [train_image_cache, validation_image_cache],
        [train_targets.reset_index(), validation_targets.reset_index()])
    classifier, result = train_classifier(
        train_image_cache, train_targets, validation_image_cache, validation_targets, config,
        checkpoint_store(config.checkpoint_folder, fingerprint, fold),
        MlflowEpochLogger.for_active_run(prefix="classifier_"), fold, engine_config(engine))
    return classifier, history_table(result), final_metrics(result, "validation_roc_auc")
