"""Nodes of the classify pipeline."""

from __future__ import annotations

import mlflow
import pandas as pd

from pneumonia_kedro.classifier import ClassifierConfig, TrainedClassifier, train_classifier
from pneumonia_kedro.config import from_params
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.training import resolve_device


def _targets(patients: pd.DataFrame) -> pd.Series:
    return patients.set_index("patientId")["Target"].astype(int)


def train_image_classifier(train_image_cache: ImageCache, validation_image_cache: ImageCache,
                           train_patients: pd.DataFrame, validation_patients: pd.DataFrame,
                           params: dict) -> tuple[TrainedClassifier, pd.DataFrame]:
    """Train the image-level classifier; return the best epoch's and the per-epoch history."""
    config = from_params(ClassifierConfig, params, "classifier")
    classifier, history = train_classifier(
        train_image_cache, _targets(train_patients), validation_image_cache,
        _targets(validation_patients), config, resolve_device(config.device))
    if mlflow.active_run():
        for row in history.to_dict("records"):
            mlflow.log_metrics({"classifier_train_loss": row["train_loss"],
                                "classifier_validation_roc_auc": row["validation_roc_auc"]},
                               step=int(row["epoch"]))
    return classifier, history
