"""Build, rebuild and run a detector of any architecture ``ModelConfig`` names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import misc as misc_nn_ops

from pneumonia_kedro.models import faster_rcnn, fcos
from pneumonia_kedro.models.config import OPACITY_LABEL, ModelConfig, model_config_from_dict
from pneumonia_kedro.pretrained import load_weights_file


def _network(config: ModelConfig, pretrained: str) -> nn.Module:
    if config.one_stage:
        return fcos.build_fcos(config, pretrained)
    return faster_rcnn.build_faster_rcnn(config, pretrained)


def predictor_layers(config: ModelConfig) -> tuple[str, ...]:
    """Name prefixes of the last, class-specific layers (``trainable: box_predictor``)."""
    return fcos.PREDICTOR if config.one_stage else faster_rcnn.PREDICTOR


def build_model(config: ModelConfig) -> nn.Module:
    """A two-class detector with the configured weights and trainable parts."""
    pretrained = config.pretrained
    is_file = pretrained not in ("coco", "imagenet", "none")
    model = _network(config, "none" if is_file else pretrained)
    if config.freeze_batchnorm:
        _freeze_batchnorm(model)
    if is_file:  # into the network as configured: its class layer may count other classes
        load_weights_file(model, Path(pretrained), "model", config.partial_weights,
                          head=fcos.CLASS_LAYER if config.one_stage else faster_rcnn.PREDICTOR)
    if config.trainable == "box_predictor":
        predictor = predictor_layers(config)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(predictor))
    return model


def check_weights_file(config: ModelConfig) -> None:
    """Read and fit a weights file that ``model.pretrained`` names (nothing is downloaded):
    a run can refuse a missing, unsafe or unfitting file before its first node."""
    if config.pretrained not in ("coco", "imagenet", "none"):
        build_model(config)


def model_from_state(config: ModelConfig | dict, state_dict: dict) -> nn.Module:
    """Rebuild a trained detector from its config and weights: no download, no pickle."""
    if isinstance(config, dict):
        config = model_config_from_dict(config)
    model = _network(config, "none")
    if not any(key.endswith("num_batches_tracked") for key in state_dict):
        _freeze_batchnorm(model)  # weights came from a model with frozen BatchNorm
    model.load_state_dict(state_dict)
    return model


@dataclass
class TrainedModel:
    """A trained detector as data: its config, its weights and how it was chosen."""

    config: ModelConfig
    state_dict: dict
    info: dict

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
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

    The model must be in eval mode; mixed precision on CUDA. Every architecture returns
    torchvision's ``boxes``/``scores``/``labels`` per image, sorted by score.
    """
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        outputs = model(to_model_input(images, device))
    return [(o["boxes"][o["labels"] == OPACITY_LABEL].float().cpu(),
             o["scores"][o["labels"] == OPACITY_LABEL].float().cpu()) for o in outputs]


def _freeze_batchnorm(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = misc_nn_ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
                setattr(module, name, frozen)
