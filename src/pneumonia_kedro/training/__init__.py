"""Training, laid out like torchvision's detection references: ``config`` (settings, seeding,
device), ``data`` (dataset over the image cache, sampler, collate), ``engine`` (one epoch,
the same for every model), ``detector`` (what the detector brings to it), ``checkpoints``
(resume state and its fingerprint), ``fit`` (the whole run, DDP start-up) and ``tracking``
(live curves, history, final metrics). The classifier brings its own task
(``classifier.ClassifierTask``) to the same ``fit_task``. No Kedro imports."""

from pneumonia_kedro.training.checkpoints import (
    CheckpointStore,
    checkpoint_store,
    training_fingerprint,
)
from pneumonia_kedro.training.config import (
    AugmentConfig,
    TrainConfig,
    resolve_device,
    seed_everything,
)
from pneumonia_kedro.training.data import (
    CachedDetectionDataset,
    EpochBatchSampler,
    detection_collate,
    targets_to,
)
from pneumonia_kedro.training.detector import DetectorTask, validation_loss
from pneumonia_kedro.training.engine import Optimisation, predict, validation_metric
from pneumonia_kedro.training.fit import TrainingResult, fit_task, train_model
from pneumonia_kedro.training.tracking import MlflowEpochLogger, final_metrics, history_table

__all__ = ["AugmentConfig", "CachedDetectionDataset", "CheckpointStore", "DetectorTask",
           "EpochBatchSampler", "MlflowEpochLogger", "Optimisation", "TrainConfig",
           "TrainingResult", "checkpoint_store", "detection_collate", "final_metrics", "fit_task",
           "history_table", "predict", "resolve_device", "seed_everything", "targets_to",
           "train_model", "training_fingerprint", "validation_loss", "validation_metric"]
