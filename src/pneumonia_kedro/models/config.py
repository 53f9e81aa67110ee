"""What rebuilds a detector: its settings (saved beside the weights) and the anchors they give."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from pneumonia_kedro.config import AT_LEAST_ONE, PROBABILITY, ConfigError, Range

NUM_CLASSES = 2  # background, lung opacity
OPACITY_LABEL = 1
Architecture = Literal["resnet50_fpn", "resnet50_fpn_v2", "mobilenet_v3_large_fpn",
                       "resnet18_fpn", "resnet34_fpn", "fcos_resnet18_fpn"]
# One-stage detectors: no region proposals, no box head (see ModelConfig).
ONE_STAGE = frozenset({"fcos_resnet18_fpn"})
COCO_ARCHITECTURES = frozenset({"resnet50_fpn", "resnet50_fpn_v2", "mobilenet_v3_large_fpn"})
# Feature maps the anchors are laid on (FCOS: anchor-free, its anchor settings ignored).
FEATURE_MAPS = {"mobilenet_v3_large_fpn": 3, "resnet50_fpn": 5, "resnet50_fpn_v2": 5,
                "resnet18_fpn": 5, "resnet34_fpn": 5}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the detector (saved beside its weights).

    ``fcos_resnet18_fpn`` is a one-stage detector: it has no RPN and no box head, so the
    ``rpn_*``, ``box_batch_size_per_image`` and ``box_head_size`` settings are ignored (not
    refused: a recipe switches the architecture of a configuration tuned for Faster R-CNN,
    such as the demo's, without resetting them). It is anchor-free: each location of the
    P3..P7 maps is one point whose level is chosen by the box's size, so ``anchor_sizes`` and
    ``anchor_ratios`` are ignored too. ``box_score_thresh``, ``box_nms_thresh`` and
    ``box_detections_per_img`` are its score threshold, NMS IoU and detection cap.
    """

    RANGES = {"image_size": Range(16), "rpn_batch_size_per_image": AT_LEAST_ONE,
              "rpn_pre_nms_top_n_train": AT_LEAST_ONE,
              "rpn_post_nms_top_n_train": AT_LEAST_ONE, "rpn_pre_nms_top_n_test": AT_LEAST_ONE,
              "rpn_post_nms_top_n_test": AT_LEAST_ONE,
              "box_batch_size_per_image": AT_LEAST_ONE, "box_head_size": AT_LEAST_ONE,
              "box_score_thresh": PROBABILITY, "box_nms_thresh": PROBABILITY,
              "box_detections_per_img": AT_LEAST_ONE, "anchor_reference_size": Range(16)}

    architecture: Architecture = "resnet50_fpn"
    pretrained: str = "coco"  # coco | imagenet | none | path to a local weights file
    # A weights file must fit the network (all but the box predictor); true loads what fits.
    partial_weights: bool = False
    trainable: str | int = "box_predictor"  # box_predictor | all | trainable backbone layers
    image_size: int = 512
    anchor_sizes: tuple | None = None  # one tuple of sizes per feature map, in cache pixels
    # The image size anchor_sizes are given for: scaled by image_size / this (None: as given),
    # so a recipe at another cache size keeps anchors that fit the boxes.
    anchor_reference_size: int | None = None
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

    def __post_init__(self) -> None:
        if not self.anchor_ratios or (self.anchor_sizes is not None
                                      and not all(self.anchor_sizes)):
            raise ConfigError(f"model.anchor_ratios = {list(self.anchor_ratios)} / anchor_sizes "
                              f"= {self.anchor_sizes}: every feature map needs at least one "
                              "anchor size and one ratio")
        if self.anchor_reference_size is not None and self.anchor_sizes is None:
            raise ConfigError("model.anchor_reference_size is set but model.anchor_sizes is "
                              "null: give the anchor sizes it scales, or leave it null")

    def check_training(self) -> None:
        """Refuse, before any node runs, settings that fail only when the detector is built
        (no COCO weights, anchors for another number of feature maps) or cannot learn:
        ``trainable: box_predictor`` keeps all but the last layers as they start, which is
        only sound when they start pretrained for detection (COCO, or a weights file). Not
        checked on load: a saved model is as it is."""
        if self.pretrained == "coco" and self.architecture not in COCO_ARCHITECTURES:
            raise ConfigError(
                f"params:model.pretrained = 'coco', but torchvision has no COCO weights for "
                f"model.architecture {self.architecture!r}: use imagenet or none")
        maps = FEATURE_MAPS.get(self.architecture)
        if maps is not None and self.anchor_sizes is not None and \
                len(self.anchor_sizes) != maps:
            raise ConfigError(
                f"params:model.anchor_sizes has {len(self.anchor_sizes)} levels but "
                f"{self.architecture} has {maps} feature maps: give {maps} lists of sizes "
                "(conf/demo's are for resnet18_fpn's 5; benchmarks/recipes.py has a 3-level "
                "set for mobilenet_v3_large_fpn), or model.anchor_sizes and "
                "model.anchor_reference_size both null for torchvision's default anchors")
        if self.trainable == "box_predictor" and self.pretrained in ("none", "imagenet"):
            raise ConfigError(
                f"params:model.trainable = 'box_predictor' trains only the last layers, but "
                f"params:model.pretrained = {self.pretrained!r} leaves the "
                f"{'backbone, ' if self.pretrained == 'none' else ''}feature pyramid and "
                "detection heads untrained, so they would stay random: set model.trainable: "
                "all (or a number of trainable backbone layers), or pretrained: coco")

    def to_dict(self) -> dict:
        values = asdict(self)
        # Left out while unset, so checkpoints written before it existed still resume.
        if values["anchor_reference_size"] is None:
            del values["anchor_reference_size"]
        return values

    @property
    def one_stage(self) -> bool:
        return self.architecture in ONE_STAGE

    def scaled_anchor_sizes(self) -> tuple[tuple[int, ...], ...] | None:
        """Anchor sizes per feature map in this model's pixels (None: torchvision's)."""
        if self.anchor_sizes is None:
            return None
        scale = 1.0 if self.anchor_reference_size is None else \
            self.image_size / self.anchor_reference_size
        # Half up, not Python's half to even: 12.5 px and 13.5 px both round up.
        return tuple(tuple(max(1, math.floor(float(s) * scale + 0.5)) for s in level)
                     for level in self.anchor_sizes)


def model_config_from_dict(values: dict) -> ModelConfig:
    """A ModelConfig from its ``to_dict()`` form (lists back to tuples)."""
    sizes = values.get("anchor_sizes")
    return ModelConfig(**{
        **values,
        "anchor_sizes": None if sizes is None else tuple(tuple(level) for level in sizes),
        "anchor_ratios": tuple(values.get("anchor_ratios", ModelConfig.anchor_ratios)),
    })
