"""Detector factory: torchvision detectors for two classes (background, opacity).

Faster R-CNN (``faster_rcnn``: MobileNetV3 or ResNet-18/34/50 FPN) and a one-stage FCOS on a
ResNet-18 FPN (``fcos``). ``min_size``/``max_size`` are set to the cache's image size so
torchvision does not silently upscale to 800 px. Weights come from torchvision's weights API
(``coco``, ``imagenet``), a local file, or nowhere (``none``); offline without a cached file
the error names the file to provide. Input is grayscale: one channel replicated to three on
the device (``to_model_input``) and normalised by the model's transform.
"""

from pneumonia_kedro.models.backbones import with_download
from pneumonia_kedro.models.config import (
    NUM_CLASSES,
    ONE_STAGE,
    OPACITY_LABEL,
    Architecture,
    ModelConfig,
    model_config_from_dict,
)
from pneumonia_kedro.models.detector import (
    TrainedModel,
    build_model,
    check_weights_file,
    detect,
    model_from_state,
    predictor_layers,
    to_model_input,
    weights_version,
)

__all__ = [
    "NUM_CLASSES", "ONE_STAGE", "OPACITY_LABEL", "Architecture", "ModelConfig", "TrainedModel",
    "build_model", "check_weights_file", "detect", "model_config_from_dict", "model_from_state",
    "predictor_layers", "to_model_input", "weights_version", "with_download",
]
