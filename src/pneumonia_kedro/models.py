"""Faster R-CNN factory: torchvision detectors for two classes (background, opacity).

``min_size``/``max_size`` are set to the cache's image size so torchvision does not silently
upscale to 800 px. Weights come from torchvision's weights API (``coco``, ``imagenet``), a
local file, or nowhere (``none``); offline without a cached file the error names the file to
provide. Input is grayscale: one channel replicated to three on the device (``to_model_input``)
and normalised by the model's transform.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet18_Weights, ResNet50_Weights
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import misc as misc_nn_ops

from pneumonia_kedro.config import AT_LEAST_ONE, PROBABILITY, Range
from pneumonia_kedro.errors import PneumoniaKedroError, WeightsUnavailableError
from pneumonia_kedro.pretrained import load_weights_file

NUM_CLASSES = 2  # background, lung opacity
OPACITY_LABEL = 1
Architecture = Literal["resnet50_fpn", "resnet50_fpn_v2", "mobilenet_v3_large_fpn",
                       "resnet18_fpn"]

_COCO_WEIGHTS = {
    "resnet50_fpn": FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
    "resnet50_fpn_v2": FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
    "mobilenet_v3_large_fpn": FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
}
_IMAGENET_WEIGHTS = {
    "resnet50_fpn": ResNet50_Weights.IMAGENET1K_V1,
    "resnet50_fpn_v2": ResNet50_Weights.IMAGENET1K_V1,
    "mobilenet_v3_large_fpn": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    "resnet18_fpn": ResNet18_Weights.IMAGENET1K_V1,
}
_BUILDERS = {
    "resnet50_fpn": fasterrcnn_resnet50_fpn,
    "resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the detector (saved beside its weights)."""

    RANGES = {"image_size": Range(16), "rpn_batch_size_per_image": AT_LEAST_ONE,
              "rpn_pre_nms_top_n_train": AT_LEAST_ONE,
              "rpn_post_nms_top_n_train": AT_LEAST_ONE, "rpn_pre_nms_top_n_test": AT_LEAST_ONE,
              "rpn_post_nms_top_n_test": AT_LEAST_ONE,
              "box_batch_size_per_image": AT_LEAST_ONE, "box_head_size": AT_LEAST_ONE,
              "box_score_thresh": PROBABILITY, "box_nms_thresh": PROBABILITY,
              "box_detections_per_img": AT_LEAST_ONE}

    architecture: Architecture = "resnet50_fpn"
    pretrained: str = "coco"  # coco | imagenet | none | path to a local weights file
    # A weights file must fit the network (all but the box predictor); true loads what fits.
    partial_weights: bool = False
    trainable: str | int = "box_predictor"  # box_predictor | all | trainable backbone layers
    image_size: int = 512
    anchor_sizes: tuple | None = None  # one tuple of sizes per feature map, in cache pixels
    anchor_ratios: tuple = (0.5, 1.0, 2.0)  # height / width
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_head_size: int = 1024  # width of the two-layer box head (torchvision: 1024)
    # Pretrained weights already freeze BatchNorm; true also freezes it for `none` or a file,
    # which makes training independent of the per-device batch (CPU DDP has no SyncBatchNorm).
    freeze_batchnorm: bool = False
    box_score_thresh: float = 0.01
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100

    def to_dict(self) -> dict:
        return asdict(self)


def _weights_file(weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def with_download(build: Callable[[], nn.Module], weights, label: str,
                  key: str = "model.pretrained") -> nn.Module:
    """Run a torchvision builder that fetches ``weights``; offline, name the file to provide
    (and the setting, ``key``, that can name a local file instead)."""
    try:
        return build()
    except OSError as exc:  # URLError and friends: no network and no cached file
        raise WeightsUnavailableError(
            f"{label} weights could not be downloaded ({exc}). Offline, put the file "
            f"{Path(weights.url).name} (from {weights.url}) at {_weights_file(weights)} "
            "(or point TORCH_HOME at a folder holding hub/checkpoints/ with it), or set "
            f"{key} to the path of a local weights file, or to 'none'."
        ) from None


def _anchor_generator(config: ModelConfig, n_maps: int) -> AnchorGenerator | None:
    if config.anchor_sizes is None:
        return None
    sizes = tuple(tuple(int(s) for s in level) for level in config.anchor_sizes)
    if len(sizes) != n_maps:
        raise PneumoniaKedroError(
            f"model.anchor_sizes has {len(sizes)} levels but {config.architecture} has "
            f"{n_maps} feature maps"
        )
    ratios = (tuple(float(r) for r in config.anchor_ratios),) * n_maps
    return AnchorGenerator(sizes, ratios)


def _detector_kwargs(config: ModelConfig) -> dict:
    kwargs = {
        "min_size": config.image_size,
        "max_size": config.image_size,
        "rpn_batch_size_per_image": config.rpn_batch_size_per_image,
        "rpn_pre_nms_top_n_train": config.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": config.rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": config.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": config.rpn_post_nms_top_n_test,
        "box_batch_size_per_image": config.box_batch_size_per_image,
        "box_score_thresh": config.box_score_thresh,
        "box_nms_thresh": config.box_nms_thresh,
        "box_detections_per_img": config.box_detections_per_img,
    }
    return kwargs


def _set_anchors(model: FasterRCNN, config: ModelConfig) -> None:
    """Anchors matched to the boxes at this image size; a new RPN head if their count changes."""
    n_maps = 3 if config.architecture == "mobilenet_v3_large_fpn" else 5
    anchors = _anchor_generator(config, n_maps)
    if anchors is None:
        return
    model.rpn.anchor_generator = anchors
    per_location = anchors.num_anchors_per_location()[0]
    head = model.rpn.head
    if head.cls_logits.out_channels != per_location:
        model.rpn.head = RPNHead(head.cls_logits.in_channels, per_location,
                                 conv_depth=len(head.conv))


def _trainable_layers(config: ModelConfig) -> int:
    most = 6 if config.architecture == "mobilenet_v3_large_fpn" else 5
    if isinstance(config.trainable, int):
        return max(0, min(config.trainable, most))
    return most if config.trainable == "all" else 0


def _build(config: ModelConfig, pretrained: str) -> FasterRCNN:
    kwargs = _detector_kwargs(config)
    layers = _trainable_layers(config)
    if config.architecture == "resnet18_fpn":
        if pretrained == "coco":
            raise PneumoniaKedroError("resnet18_fpn has no COCO weights; use imagenet or none")
        weights = _IMAGENET_WEIGHTS["resnet18_fpn"] if pretrained == "imagenet" else None

        def make() -> FasterRCNN:
            backbone = resnet_fpn_backbone(
                backbone_name="resnet18", weights=weights,
                trainable_layers=layers if weights else 5,
                norm_layer=misc_nn_ops.FrozenBatchNorm2d if weights else nn.BatchNorm2d,
            )
            return FasterRCNN(backbone, num_classes=NUM_CLASSES, **kwargs)

        return with_download(make, weights, "ImageNet") if weights else make()

    builder = _BUILDERS[config.architecture]
    if pretrained == "coco":
        weights = _COCO_WEIGHTS[config.architecture]
        return with_download(
            lambda: builder(weights=weights, trainable_backbone_layers=layers, **kwargs),
            weights, "COCO")
    if pretrained == "imagenet":
        weights = _IMAGENET_WEIGHTS[config.architecture]
        return with_download(
            lambda: builder(weights=None, weights_backbone=weights, num_classes=NUM_CLASSES,
                            trainable_backbone_layers=layers, **kwargs),
            weights, "ImageNet")
    return builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **kwargs)


def _set_box_head(model: FasterRCNN, config: ModelConfig) -> None:
    """A narrower box head: on a CPU its first layer, not the backbone, dominates step time."""
    head = model.roi_heads.box_head
    if not isinstance(head, TwoMLPHead) or head.fc7.out_features == config.box_head_size:
        return
    model.roi_heads.box_head = TwoMLPHead(head.fc6.in_features, config.box_head_size)
    model.roi_heads.box_predictor = FastRCNNPredictor(config.box_head_size, NUM_CLASSES)


def build_model(config: ModelConfig) -> FasterRCNN:
    """A two-class Faster R-CNN with the configured weights and trainable parts."""
    pretrained = config.pretrained
    is_file = pretrained not in ("coco", "imagenet", "none")
    model = _build(config, "none" if is_file else pretrained)
    _set_anchors(model, config)
    _set_box_head(model, config)
    if config.freeze_batchnorm:
        _freeze_batchnorm(model)
    predictor = model.roi_heads.box_predictor
    if predictor.cls_score.out_features != NUM_CLASSES:
        model.roi_heads.box_predictor = FastRCNNPredictor(predictor.cls_score.in_features,
                                                          NUM_CLASSES)
    if is_file:  # into the network as configured: its box predictor has another class count
        load_weights_file(model, Path(pretrained), "model", config.partial_weights,
                          head=("roi_heads.box_predictor.",))
    if config.trainable == "box_predictor":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in model.roi_heads.box_predictor.parameters():
            parameter.requires_grad_(True)
    return model


def check_weights_file(config: ModelConfig) -> None:
    """Read and fit a weights file that ``model.pretrained`` names (nothing is downloaded):
    a run can refuse a missing, unsafe or unfitting file before its first node."""
    if config.pretrained not in ("coco", "imagenet", "none"):
        build_model(config)


@dataclass
class TrainedModel:
    """A trained detector as data: its config, its weights and how it was chosen."""

    config: ModelConfig
    state_dict: dict
    info: dict

    def build(self, device: torch.device | str = "cpu") -> FasterRCNN:
        model = model_from_state(self.config, self.state_dict).to(device)
        return model.eval()

    @property
    def version(self) -> str:
        """Architecture and a digest of the weights: names the model in DICOM SRs."""
        return weights_version(self.config.architecture, self.state_dict)


def weights_version(architecture: str, state_dict: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return f"{architecture}-{digest.hexdigest()[:12]}"


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool = False
                   ) -> list[torch.Tensor]:
    """uint8 (B, 1, H, W) on any device -> list of float (3, H, W) in [0, 1] on ``device``."""
    batch = images.to(device, non_blocking=True).float().div_(255.0).expand(-1, 3, -1, -1)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return list(batch)


@torch.inference_mode()
def detect(model: nn.Module, images: torch.Tensor, device: torch.device
           ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Opacity boxes (``xyxy``, input pixels) and scores per uint8 image, on the CPU.

    The model must be in eval mode; mixed precision on CUDA.
    """
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        outputs = model(to_model_input(images, device))
    return [(o["boxes"][o["labels"] == OPACITY_LABEL].float().cpu(),
             o["scores"][o["labels"] == OPACITY_LABEL].float().cpu()) for o in outputs]


def model_config_from_dict(values: dict) -> ModelConfig:
    """A ModelConfig from its ``to_dict()`` form (lists back to tuples)."""
    sizes = values.get("anchor_sizes")
    return ModelConfig(**{
        **values,
        "anchor_sizes": None if sizes is None else tuple(tuple(level) for level in sizes),
        "anchor_ratios": tuple(values.get("anchor_ratios", ModelConfig.anchor_ratios)),
    })


def model_from_state(config: ModelConfig | dict, state_dict: dict) -> FasterRCNN:
    """Rebuild a trained detector from its config and weights: no download, no pickle."""
    if isinstance(config, dict):
        config = model_config_from_dict(config)
    model = _build(config, "none")
    _set_anchors(model, config)
    _set_box_head(model, config)
    if model.roi_heads.box_predictor.cls_score.out_features != NUM_CLASSES:
        model.roi_heads.box_predictor = FastRCNNPredictor(
            model.roi_heads.box_predictor.cls_score.in_features, NUM_CLASSES)
    if not any(key.endswith("num_batches_tracked") for key in state_dict):
        _freeze_batchnorm(model)  # weights came from a model with frozen BatchNorm
    model.load_state_dict(state_dict)
    return model


def _freeze_batchnorm(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = misc_nn_ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
                setattr(module, name, frozen)
