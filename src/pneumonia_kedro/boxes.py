"""Box formats and the mapping between original-image and cache pixel coordinates.

Two formats, named as in MONAI: ``xywh`` (the competition's top-left corner plus size) and
``xyxy`` (torchvision's corners). Boxes are float arrays of shape (N, 4); no boxes is (0, 4).
Conversion happens once at the boundary: inside the project everything is ``xyxy``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pneumonia_kedro.errors import BoxError


def as_boxes(boxes: object) -> np.ndarray:
    """Return ``boxes`` as a float64 array of shape (N, 4), (0, 4) when empty."""
    try:
        array = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BoxError(f"boxes must be numbers of shape (N, 4): {exc}") from None
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 4:
        raise BoxError(f"boxes must have shape (N, 4), got {array.shape}")
    if not np.isfinite(array).all():
        raise BoxError(f"boxes must be finite, got {array[~np.isfinite(array).all(1)][0]}")
    return array


def xywh_to_xyxy(boxes: object) -> np.ndarray:
    """Convert competition boxes (x, y, width, height) to corners (x1, y1, x2, y2)."""
    b = as_boxes(boxes).copy()
    b[:, 2:] += b[:, :2]
    return b


def xyxy_to_xywh(boxes: object) -> np.ndarray:
    """Convert corners (x1, y1, x2, y2) to competition boxes (x, y, width, height)."""
    b = as_boxes(boxes).copy()
    b[:, 2:] -= b[:, :2]
    return b


@dataclass(frozen=True)
class Letterbox:
    """How an original image of ``height`` x ``width`` sits inside a square cache image.

    cache = original * scale + offset, per axis. The scales are the exact ratios of the resized
    size to the original size, so mapping back recovers original pixel coordinates.
    """

    height: int
    width: int
    size: int
    scale_x: float
    scale_y: float
    offset_x: int
    offset_y: int

    @classmethod
    def fit(cls, height: int, width: int, size: int) -> Letterbox:
        """Scale the longer side to ``size`` and centre the shorter one with padding."""
        if min(height, width, size) <= 0:
            raise BoxError(f"sizes must be positive, got {height}x{width} -> {size}")
        ratio = size / max(height, width)
        resized_h = max(1, round(height * ratio))
        resized_w = max(1, round(width * ratio))
        return cls(
            height=int(height),
            width=int(width),
            size=int(size),
            scale_x=resized_w / width,
            scale_y=resized_h / height,
            offset_x=(size - resized_w) // 2,
            offset_y=(size - resized_h) // 2,
        )

    @property
    def resized_height(self) -> int:
        return round(self.height * self.scale_y)

    @property
    def resized_width(self) -> int:
        return round(self.width * self.scale_x)

    def to_cache(self, boxes_xyxy: object) -> np.ndarray:
        """Map ``xyxy`` boxes from original to cache pixel coordinates."""
        b = as_boxes(boxes_xyxy).copy()
        b[:, [0, 2]] = b[:, [0, 2]] * self.scale_x + self.offset_x
        b[:, [1, 3]] = b[:, [1, 3]] * self.scale_y + self.offset_y
        return b

    def to_original(self, boxes_xyxy: object, clip: bool = True) -> np.ndarray:
        """Map ``xyxy`` boxes from cache back to original pixel coordinates."""
        b = as_boxes(boxes_xyxy).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.offset_x) / self.scale_x
        b[:, [1, 3]] = (b[:, [1, 3]] - self.offset_y) / self.scale_y
        if clip:
            b[:, [0, 2]] = b[:, [0, 2]].clip(0, self.width)
            b[:, [1, 3]] = b[:, [1, 3]].clip(0, self.height)
        return b

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)
