"""Two-stage detectors: torchvision's Faster R-CNN on MobileNetV3 or ResNet FPN backbones,
with anchors, sampling and box head sized for the cache (``ModelConfig``)."""

from __future__ import annotations

from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights
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
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead

from pneumonia_kedro.errors import PneumoniaKedroError
from pneumonia_kedro.models.backbones import resnet_fpn, with_download
from pneumonia_kedro.models.config import NUM_CLASSES, ModelConfig

# The layers whose shape follows the class count: replaced, trained alone on request.
PREDICTOR = ("roi_heads.box_predictor.",)
_COCO_WEIGHTS = {
    "resnet50_fpn": FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
    "resnet50_fpn_v2": FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
    "mobilenet_v3_large_fpn": FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
}
_IMAGENET_WEIGHTS = {
    "resnet50_fpn": ResNet50_Weights.IMAGENET1K_V1,
    "resnet50_fpn_v2": ResNet50_Weights.IMAGENET1K_V1,
    "mobilenet_v3_large_fpn": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}
_BUILDERS = {
    "resnet50_fpn": fasterrcnn_resnet50_fpn,
    "resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
}
_SMALL_RESNETS = {"resnet18_fpn": "resnet18", "resnet34_fpn": "resnet34"}


def _anchor_generator(config: ModelConfig, n_maps: int) -> AnchorGenerator | None:
    sizes = config.scaled_anchor_sizes()
    if sizes is None:
        return None
    if len(sizes) != n_maps:
        raise PneumoniaKedroError(
            f"model.anchor_sizes has {len(sizes)} levels but {config.architecture} has "
            f"{n_maps} feature maps"
        )
    ratios = (tuple(float(r) for r in config.anchor_ratios),) * n_maps
    return AnchorGenerator(sizes, ratios)


def _detector_kwargs(config: ModelConfig) -> dict:
    return {
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


def trainable_layers(config: ModelConfig) -> int:
    most = 6 if config.architecture == "mobilenet_v3_large_fpn" else 5
    if isinstance(config.trainable, int):
        return max(0, min(config.trainable, most))
    return most if config.trainable == "all" else 0


def _network(config: ModelConfig, pretrained: str) -> FasterRCNN:
    kwargs = _detector_kwargs(config)
    layers = trainable_layers(config)
    if config.architecture in _SMALL_RESNETS:
        return resnet_fpn(config.architecture, _SMALL_RESNETS[config.architecture],
                          pretrained, layers,
                          lambda backbone: FasterRCNN(backbone, num_classes=NUM_CLASSES,
                                                      **kwargs))
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


def build_faster_rcnn(config: ModelConfig, pretrained: str) -> FasterRCNN:
    """The configured Faster R-CNN with ``pretrained`` weights (coco, imagenet or none) and
    a two-class box predictor."""
    model = _network(config, pretrained)
    _set_anchors(model, config)
    _set_box_head(model, config)
    predictor = model.roi_heads.box_predictor
    if predictor.cls_score.out_features != NUM_CLASSES:
        model.roi_heads.box_predictor = FastRCNNPredictor(predictor.cls_score.in_features,
                                                          NUM_CLASSES)
    return model
