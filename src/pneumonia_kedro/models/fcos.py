"""A one-stage detector trained from scratch: torchvision's FCOS on a ResNet-18 FPN (P3..P7).

Chosen over RetinaNet for small CPU budgets from scratch: it is anchor-free (no anchor set to
fit each cache size; RetinaNet's IoU >= 0.5 anchor matching leaves few positives for the tall
RSNA boxes), every location near a box's centre is a positive (more signal per image), and
torchvision's FCOS head normalises with GroupNorm, which trains from scratch at the batch sizes
a CPU affords (its RetinaNet head has no normalisation).
"""

from __future__ import annotations

import torch
from torchvision.models.detection import FCOS
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pneumonia_kedro.models.backbones import resnet_fpn
from pneumonia_kedro.models.config import OPACITY_LABEL, ModelConfig

# The head's last layers (class, box, centre-ness): the class layer follows the class count.
PREDICTOR = ("head.classification_head.cls_logits.", "head.regression_head.bbox_reg.",
             "head.regression_head.bbox_ctrness.")
CLASS_LAYER = ("head.classification_head.cls_logits.",)


class OpacityFCOS(FCOS):
    """FCOS with one sigmoid class, opacity, labelled ``OPACITY_LABEL`` outside as the Faster
    R-CNN's are. A second, never-positive background logit (torchvision's COCO convention)
    would compete for the detection cap with boxes that are later filtered out."""

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - OPACITY_LABEL} for t in targets]
        result = super().forward(images, targets)
        if self.training:
            return result
        return [{**d, "labels": d["labels"] + OPACITY_LABEL} for d in result]


def build_fcos(config: ModelConfig, pretrained: str) -> FCOS:
    """FCOS for the opacity class at the cache's size; ``box_*`` settings are its score
    threshold, NMS IoU and detection cap."""
    layers = config.trainable if isinstance(config.trainable, int) else \
        (5 if config.trainable == "all" else 0)

    def make(backbone: object) -> FCOS:
        return OpacityFCOS(backbone, num_classes=1, min_size=config.image_size,
                    max_size=config.image_size, score_thresh=config.box_score_thresh,
                    nms_thresh=config.box_nms_thresh,
                    detections_per_img=config.box_detections_per_img)

    return resnet_fpn(config.architecture, "resnet18", pretrained, max(0, min(layers, 5)),
                      make, returned_layers=[2, 3, 4],
                      extra_blocks=LastLevelP6P7(256, 256))
