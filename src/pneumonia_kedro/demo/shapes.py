"""Drawing helpers shared by the demo's renderers: seeded streams, soft shapes, noise."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np


def _rng(*keys: object) -> np.random.Generator:
    """A random stream keyed by text (seed, patient, purpose): reproducible and independent."""
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
             softness: float = 0.08) -> np.ndarray:
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1 + softness - r) / (2 * softness), 0, 1)


def branches(canvas: np.ndarray, start: tuple[float, float], angle: float, length: float,
             width: float, depth: int, rng: np.random.Generator, value: float = 1.0) -> None:
    """Draw a branching tree (vessels, bronchi) into ``canvas``, in pixels: each generation
    thinner, shorter and fainter than its parent."""
    end = (start[0] + length * np.cos(angle), start[1] + length * np.sin(angle))
    cv2.line(canvas, (int(start[0]), int(start[1])), (int(end[0]), int(end[1])), value,
             max(1, round(width)), cv2.LINE_AA)
    if depth <= 0:
        return
    for turn in (-1.0, 1.0):
        branches(canvas, end, angle + turn * rng.uniform(0.25, 0.6), length * rng.uniform(0.6, 0.8),
                 width * 0.7, depth - 1, rng, value * 0.8)
