"""What a harder demo film carries besides opacities: other findings, devices, markers."""

from __future__ import annotations

import cv2
import numpy as np

from .shapes import _ellipse


def _findings(findings: set[str], yy: np.ndarray, xx: np.ndarray, lungs: np.ndarray,
              dy: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness of non-opacity findings (the heart is enlarged by the caller)."""
    extra = np.zeros_like(yy)
    if "effusion" in findings:  # fluid at one lung base: a bright meniscus
        side = 1.0 if rng.random() < 0.5 else -1.0
        level = 0.62 + dy + rng.uniform(0, 0.08)
        extra += 0.22 * lungs * np.clip((yy - level) * 12, 0, 1) * (np.sign(xx - 0.5) == side)
    if "nodules" in findings:  # a few small round densities
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.uniform(0.25, 0.7), rng.choice([0.3, 0.7]) + rng.normal(0, 0.06)
            radius = rng.uniform(0.008, 0.02)
            extra += 0.25 * _ellipse(yy, xx, cy, cx, radius, radius, 0.3) * lungs
    if "scar" in findings:  # a thin linear band (plate atelectasis, fibrosis)
        cy, cx, angle = rng.uniform(0.4, 0.7), rng.choice([0.3, 0.7]), rng.uniform(-0.4, 0.4)
        distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        along = np.abs((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle))
        extra += 0.18 * np.exp(-((distance / 0.006) ** 2)) * (along < 0.08) * lungs
    return extra


def _devices_and_markers(size: int, d: float, rng: np.random.Generator) -> np.ndarray:
    """ECG leads with wires, a tube or line, and a burned-in text marker: bright, sharp."""
    canvas = np.zeros((size, size), dtype=np.float32)
    unit = size / 1024
    if rng.random() < 0.6 * d:  # ECG electrodes and their wires
        for _ in range(rng.integers(2, 5)):
            centre = rng.uniform([150, 150], [874, 700]) * unit
            cv2.circle(canvas, tuple(int(v) for v in centre), int(14 * unit), 0.5, -1)
            end = (int(rng.uniform(0, size)), 0 if rng.random() < 0.5 else size - 1)
            middle = (centre + np.array(end)) / 2 + rng.normal(0, 80 * unit, 2)
            wire = np.array([centre, middle, end], dtype=np.int32)
            cv2.polylines(canvas, [wire], False, 0.35, max(1, int(3 * unit)))
    if rng.random() < 0.5 * d:  # an endotracheal tube or a central line down the middle
        x0 = size / 2 + rng.normal(0, 20 * unit)
        points = np.array([[x0, 0], [x0 + rng.normal(0, 15 * unit), 0.25 * size],
                           [x0 + rng.normal(0, 40 * unit), rng.uniform(0.35, 0.6) * size]],
                          dtype=np.int32)
        cv2.polylines(canvas, [points], False, 0.45, max(1, int(6 * unit)))
    if rng.random() < d:  # a text marker: a row of letter-sized blocks in a top corner
        x = int(rng.choice([0.04, 0.80]) * size)
        for i in range(rng.integers(1, 6)):
            left = x + int(i * 22 * unit)
            cv2.rectangle(canvas, (left, int(40 * unit)), (left + int(14 * unit),
                                                            int(66 * unit)), 0.9, -1)
    return cv2.GaussianBlur(canvas, (0, 0), max(0.5, 1.2 * unit))
