"""Training the detector, laid out like torchvision's detection references: ``config``
(settings, seeding, device), ``data`` (dataset over the image cache, sampler, collate),
``engine`` (one epoch of training, validation), ``checkpoints`` (resume state and its
fingerprint) and ``fit`` (the whole run, DDP start-up). No Kedro imports."""

from pneumonia_kedro.training.checkpoints import CheckpointStore, training_fingerprint
from pneumonia_kedro.training.config import (
    AugmentConfig,
    TrainConfig,
    resolve_device,
    seed_everything,
    use_fold_device,
)
from pneumonia_kedro.training.data import (
    CachedDetectionDataset,
    EpochBatchSampler,
    detection_collate,
    targets_to,
)
from pneumonia_kedro.training.engine import predict, validation_loss, validation_metric
from pneumonia_kedro.training.fit import TrainingResult, train_model

__all__ = ["AugmentConfig", "CachedDetectionDataset", "CheckpointStore", "EpochBatchSampler",
           "TrainConfig", "TrainingResult", "detection_collate", "predict", "resolve_device",
           "seed_everything", "targets_to", "train_model", "training_fingerprint",
           "use_fold_device", "validation_loss", "validation_metric"]
