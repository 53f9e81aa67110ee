"""Weights through torchvision's API (offline: the file to provide) and ResNet FPN backbones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet34_Weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import misc as misc_nn_ops

from pneumonia_kedro.errors import PneumoniaKedroError, WeightsUnavailableError

RESNET_IMAGENET = {"resnet18": ResNet18_Weights.IMAGENET1K_V1,
                   "resnet34": ResNet34_Weights.IMAGENET1K_V1}


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


def resnet_fpn(architecture: str, resnet: str, pretrained: str, trainable_layers: int,
               make: Callable[[BackboneWithFPN], nn.Module], **fpn: object) -> nn.Module:
    """``make`` a detector on a ResNet FPN backbone: ImageNet weights (frozen BatchNorm,
    ``trainable_layers`` trained) or none (every layer and BatchNorm trained). No COCO
    weights exist for these detectors in torchvision."""
    if pretrained == "coco":
        raise PneumoniaKedroError(f"{architecture} has no COCO weights; use imagenet or none")
    weights = RESNET_IMAGENET[resnet] if pretrained == "imagenet" else None

    def build() -> nn.Module:
        backbone = resnet_fpn_backbone(
            backbone_name=resnet, weights=weights,
            trainable_layers=trainable_layers if weights else 5,
            norm_layer=misc_nn_ops.FrozenBatchNorm2d if weights else nn.BatchNorm2d, **fpn)
        return make(backbone)

    return with_download(build, weights, "ImageNet") if weights else build()
