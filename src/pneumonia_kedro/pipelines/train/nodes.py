"""Nodes of the train pipeline."""

from __future__ import annotations

import dataclasses
import logging

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.models import ModelConfig, TrainedModel
from pneumonia_kedro.training import (
    CachedDetectionDataset,
    CheckpointStore,
    TrainConfig,
    train_model,
    training_fingerprint,
)

logger = logging.getLogger(__name__)


class MlflowEpochLogger:
    """Logs each epoch's metrics with ``step=epoch`` to one MLflow run, from any process."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def __call__(self, metrics: dict, epoch: int) -> None:
        client = MlflowClient(self.tracking_uri)
        for key, value in metrics.items():
            client.log_metric(self.run_id, key, float(value), step=epoch)


def train(
    train_image_cache: ImageCache,
    validation_image_cache: ImageCache,
    train_patients: pd.DataFrame,
    validation_patients: pd.DataFrame,
    training_checkpoints: CheckpointStore,
    model_params: dict,
    train_params: dict,
) -> tuple[TrainedModel, pd.DataFrame]:
    """Train the detector; return the best epoch's model and the per-epoch history."""
    model_config = from_params(ModelConfig, model_params, "model")
    config = from_params(TrainConfig, train_params, "train")
    if "image_size" in model_params and model_config.image_size != train_image_cache.image_size:
        raise ConfigError(
            f"params:model.image_size = {model_config.image_size} differs from the image "
            f"cache's {train_image_cache.image_size} px: the model follows the cache; set "
            "cache.image_size instead, and leave model.image_size out")
    model_config = dataclasses.replace(model_config, image_size=train_image_cache.image_size)
    train_data = CachedDetectionDataset(train_image_cache, train_patients,
                                        config.negative_boxes, config.augment)
    # Validation is always scored against the real truth (negatives have no box), also when
    # training reproduces the notebook's whole-image boxes: those inflate any score.
    validation_data = CachedDetectionDataset(validation_image_cache, validation_patients)
    run = mlflow.active_run()
    epoch_logger = MlflowEpochLogger(mlflow.get_tracking_uri(), run.info.run_id) if run else None
    fingerprint = training_fingerprint(
        model_config, config, [train_image_cache, validation_image_cache],
        [train_patients, validation_patients])
    result = train_model(model_config, config, train_data, validation_data,
                         training_checkpoints.bound_to(fingerprint), epoch_logger)
    info = {"best_epoch": result.best_epoch,
            "best_validation_competition_metric": result.best_metric,
            "epochs": config.epochs, "negative_boxes": config.negative_boxes,
            "score_threshold": config.score_threshold}
    if run:
        mlflow.log_metrics({"best_epoch": result.best_epoch,
                            "best_validation_competition_metric": result.best_metric})
        mlflow.set_tag("resumed_after_epoch", str(result.resumed_after_epoch))
    history = pd.DataFrame(result.history)
    # Epochs trained by an earlier, interrupted run and replayed from its checkpoint.
    history["resumed_from_checkpoint"] = history["epoch"] <= result.resumed_after_epoch
    return (TrainedModel(config=model_config, state_dict=result.best_state, info=info),
            history)
