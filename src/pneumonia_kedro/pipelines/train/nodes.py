"""Nodes of the train pipeline."""

from __future__ import annotations

import dataclasses

import pandas as pd

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.engines import engine_config
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.models import ModelConfig, TrainedModel
from pneumonia_kedro.training import (
    CachedDetectionDataset,
    MlflowEpochLogger,
    TrainConfig,
    checkpoint_store,
    final_metrics,
    history_table,
    train_model,
    training_fingerprint,
)


def train(
    train_image_cache: ImageCache,
    validation_image_cache: ImageCache,
    train_patients: pd.DataFrame,
    validation_patients: pd.DataFrame,
    model_params: dict,
    train_params: dict,
    engine: dict | str | None = None,
    fold: int | None = None,
) -> tuple[TrainedModel, pd.DataFrame, dict]:
    """Train the detector; return the best epoch's model, the per-epoch history and the final
    metrics. ``engine``: here or on Ray Train; ``fold``: the cross-validation fold (its
    checkpoint folder and GPU)."""
    model_config = from_params(ModelConfig, model_params, "model")
    model_config.check_training()
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
    fingerprint = training_fingerprint(
        model_config, config, [train_image_cache, validation_image_cache],
        [train_patients, validation_patients])
    result = train_model(model_config, config, train_data, validation_data,
                         checkpoint_store(config.checkpoint_folder, fingerprint, fold),
                         MlflowEpochLogger.for_active_run(), fold, engine_config(engine))
    info = {"best_epoch": result.best_epoch,
            "best_validation_competition_metric": result.best_metric,
            "epochs": config.epochs, "negative_boxes": config.negative_boxes,
            "score_threshold": config.score_threshold}
    return (TrainedModel(config=model_config, state_dict=result.best_state, info=info),
            history_table(result), final_metrics(result, "validation_competition_metric"))
