"""Training settings (the notebook's knobs and more), seeding and the device."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from pneumonia_kedro.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, Range


@dataclass(frozen=True)
class AugmentConfig:
    """Box-aware augmentation at training time (none at validation)."""

    RANGES = {"horizontal_flip": PROBABILITY, "translate": Range(0, 0.5),
              "brightness": Range(0, 1), "contrast": Range(0, 1)}

    horizontal_flip: float = 0.5
    scale: tuple = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """The notebook's knobs (batch 8, SGD 0.005/0.9/0.0005, StepLR 3/0.1, 5 epochs) and more."""

    RANGES = {"epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE,
              "validation_batch_size": AT_LEAST_ONE, "learning_rate": POSITIVE,
              "momentum": Range(0, 1, high_open=True), "weight_decay": NON_NEGATIVE,
              "step_size": AT_LEAST_ONE, "gamma": Range(0, 1, low_open=True),
              "warmup_iterations": NON_NEGATIVE, "warmup_factor": Range(0, 1, low_open=True),
              "grad_clip_norm": POSITIVE, "num_workers": NON_NEGATIVE,
              "score_threshold": PROBABILITY, "world_size": AT_LEAST_ONE}

    epochs: int = 5
    batch_size: int = 8
    validation_batch_size: int = 16
    learning_rate: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.0005
    scheduler: Literal["step", "cosine"] = "step"
    step_size: int = 3
    gamma: float = 0.1
    warmup_iterations: int = 100
    warmup_factor: float = 0.001
    grad_clip_norm: float | None = 10.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # on CUDA only
    channels_last: bool = True  # on CUDA only
    seed: int = 42
    num_workers: int = 0
    negative_boxes: Literal["empty", "whole_image"] = "empty"
    score_threshold: float | None = None  # per-epoch metric; None: best of a 0.05 grid
    inclusive_iou: bool = False
    resume: bool = True  # from a last checkpoint of the same settings and data
    checkpoint_folder: str | None = None  # the last epoch's state and the best weights
    world_size: int | Literal["auto"] = 1  # DDP processes (GPUs, or CPU processes on gloo);
    # auto: one per visible GPU (1 without a GPU)
    progress: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def auto_world_size(device: str) -> int:
    """``train.world_size: auto``: every visible GPU when training on CUDA, else 1."""
    if resolve_device(device).type != "cuda":
        return 1
    return max(1, torch.cuda.device_count())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str, fold: int | None = None) -> torch.device:
    """The device of ``train.device`` / ``classifier.device``: ``auto`` is CUDA when present.

    With several GPUs, cross-validation fold ``fold`` trains on GPU ``fold`` mod their count,
    so folds run side by side (``--runner ThreadRunner``) each get their own.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or "
                           "'cpu'")
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if fold is None
                            else f"cuda:{fold % torch.cuda.device_count()}")
    return torch.device(requested)
