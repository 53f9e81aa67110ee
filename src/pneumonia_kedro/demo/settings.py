"""The demo_data parameter group and the image size every demo file has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pneumonia_kedro.config import NON_NEGATIVE, Range

IMAGE_SIZE = 1024
# The looks the generator can render (styles.STYLES holds each one's rendering choices).
StyleName = Literal["classic", "ground_glass", "consolidation", "patchy"]


@dataclass(frozen=True)
class DemoConfig:
    """Size, seed, difficulty and style of the demo dataset."""

    RANGES = {"n_positive": NON_NEGATIVE, "n_negative": NON_NEGATIVE, "n_test": NON_NEGATIVE,
              "jpeg_quality": Range(1, 100), "difficulty": Range(0, 1)}

    n_positive: int = 100
    n_negative: int = 100
    n_test: int = 20
    seed: int = 42
    jpeg_quality: int = 92
    difficulty: float = 0.0  # 0: clear opacities; towards 1: as hard as the real task
    style: StyleName = "classic"  # how the film looks; labels are the same in every style
