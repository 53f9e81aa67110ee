"""Styles: how a demo film looks, independent of how hard it is (``difficulty``).

A style is a fixed set of rendering choices: the opacity's texture, the image statistics
(window and gamma, sharpness, the noise's grain) and the anatomy's proportions. It never
changes the patients, the boxes or the split: only the pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np

from .settings import StyleName
from .shapes import _ellipse, _smooth_noise, branches

Texture = Literal["cloud", "ground_glass", "consolidation", "patchy"]


@dataclass(frozen=True)
class Style:
    """The rendering choices of one look. Anatomy values are factors of the classic chest;
    lengths in pixels are those of a 1024-pixel film."""

    name: str
    # Opacity texture, and the lung vessel markings it shows or hides (classic draws none).
    texture: Texture = "cloud"
    vessels: float = 0.0
    # Anatomy proportions.
    body_width: float = 1.0
    lung_height: float = 1.0
    lung_width: float = 1.0
    lung_spacing: float = 1.0  # each lung's distance from the midline
    mediastinum_width: float = 1.0  # the mediastinum and the heart
    rib_spacing: float = 1.0
    # Image statistics: the grey range shown black to white, its gamma, sharpness and grain.
    window: tuple[float, float] = (0.0, 1.0)
    gamma: float = 1.0
    blur: float = 0.0  # Gaussian sigma: a softer detector
    unsharp: float = 0.0  # edge enhancement, as computed radiography applies it
    grain: float = 0.03  # amplitude of the smooth large-scale mottle
    grain_cells: int = 48  # that mottle's cells per side
    noise: float = 0.015  # amplitude of the pixel noise
    noise_blur: float = 0.0  # its correlation length: 0 is fine grain, larger is coarser


STYLES: dict[str, Style] = {style.name: style for style in (
    Style("classic"),  # the generator as it always was: the same seed gives the same bytes
    Style("ground_glass", texture="ground_glass", vessels=0.07, body_width=0.92,
          lung_height=1.06, lung_width=0.92, mediastinum_width=1.15, rib_spacing=1.15,
          window=(0.02, 0.92), gamma=0.85, blur=1.6, grain=0.02, grain_cells=96,
          noise=0.012, noise_blur=1.2),
    Style("consolidation", texture="consolidation", vessels=0.06, body_width=1.06,
          lung_height=0.94, lung_width=1.08, lung_spacing=1.04, mediastinum_width=0.9,
          rib_spacing=0.9, window=(0.0, 0.9), gamma=1.25, unsharp=0.8, grain=0.015,
          grain_cells=32, noise=0.02),
    Style("patchy", texture="patchy", vessels=0.06, body_width=0.98, lung_height=1.02,
          lung_spacing=0.96, mediastinum_width=1.08, rib_spacing=1.05, window=(-0.08, 1.05),
          blur=0.8, grain=0.035, grain_cells=24, noise=0.015, noise_blur=2.0),
)}
if set(STYLES) != set(get_args(StyleName)):  # the config's allowed values are these styles
    raise RuntimeError("demo styles and settings.StyleName disagree")


def style_named(name: str) -> Style:
    """The style called ``name``; an unknown name is refused, listing the known ones."""
    if name not in STYLES:
        raise ValueError(f"demo_data.style = {name!r} is not a demo style; allowed values: "
                         + ", ".join(map(repr, STYLES)))
    return STYLES[name]


def vessel_markings(lungs: np.ndarray, hila: list[tuple[float, float, float]],
                    strength: float, rng: np.random.Generator) -> np.ndarray:
    """Branching vessels fanning out from each hilum (x, y, lung height; pixels)."""
    size = lungs.shape[0]
    unit = size / 1024
    canvas = np.zeros_like(lungs, dtype=np.float32)
    for x, y, height in hila:
        lateral = 0.0 if x > size / 2 else np.pi  # towards the chest wall
        for _ in range(rng.integers(5, 8)):
            tilt = rng.uniform(-1.3, 1.3)  # from up to down, across the lung
            angle = lateral + tilt if lateral == 0.0 else lateral - tilt
            branches(canvas, (x, y), angle, height * rng.uniform(0.12, 0.18), 5 * unit, 3, rng)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 1.5 * unit)
    return strength * canvas * lungs.astype(np.float32)


def _ground_glass(yy, xx, box, d, rng, hidden, origin) -> np.ndarray:
    """A faint, hazy fill with soft edges: added on top, so vessels and ribs still show."""
    x, y, w, h = box
    cloud = _ellipse(yy, xx, y + h / 2, x + w / 2, h / 2, w / 2, 0.35 + 0.45 * d)
    haze = 0.9 + (0.1 + 0.4 * d) * _smooth_noise(rng, yy.shape, 8)
    return (0.15 + 0.03 * rng.random()) * (1 - 0.65 * d) * cloud * np.clip(haze, 0, 1.2)


def _consolidation(yy, xx, box, d, rng, hidden, origin) -> np.ndarray:
    """A dense fill with a sharp edge that hides the vessels beneath, crossed by lucent
    branching airways (air bronchograms)."""
    x, y, w, h = box
    size = origin[2]
    cloud = _ellipse(yy, xx, y + h / 2, x + w / 2, h / 2, w / 2, 0.06 + 0.45 * d)
    strength = (0.30 + 0.06 * rng.random()) * (1 - 0.65 * d)
    fill = strength * cloud * np.clip(0.9 + (0.1 + 0.5 * d) * _smooth_noise(rng, yy.shape, 6),
                                      0, 1.2)
    airways = np.zeros(yy.shape, dtype=np.float32)
    medial = x + w if x + w / 2 < 0.5 else x  # airways enter from the hilum's side
    start = ((medial - origin[1]) * size, (y + h * rng.uniform(0.35, 0.65) - origin[0]) * size)
    for _ in range(rng.integers(1, 3)):
        angle = (np.pi if medial > x else 0.0) + rng.normal(0, 0.3)
        branches(airways, start, angle, 0.3 * w * size, 7 * size / 1024, 3, rng)
    airways = cv2.GaussianBlur(airways, (0, 0), 2.5 * size / 1024)
    core = _ellipse(yy, xx, y + h / 2, x + w / 2, 0.42 * h, 0.42 * w, 0.2)
    return fill * (1 - 0.35 * np.clip(airways, 0, 1) * core) - hidden * cloud


def _patchy(yy, xx, box, d, rng, hidden, origin) -> np.ndarray:
    """Several blotches scattered inside the box rather than one filled shape."""
    x, y, w, h = box
    blotches = np.zeros(yy.shape, dtype=np.float32)
    for _ in range(rng.integers(3, 8)):
        cy, cx = y + h * rng.uniform(0.2, 0.8), x + w * rng.uniform(0.2, 0.8)
        radius = min(w, h) * rng.uniform(0.12, 0.28)
        blotch = _ellipse(yy, xx, cy, cx, radius * rng.uniform(0.7, 1.4), radius,
                          0.35 + 0.4 * d)
        blotches = np.maximum(blotches, rng.uniform(0.6, 1.0) * blotch)
    inside = _ellipse(yy, xx, y + h / 2, x + w / 2, h / 2, w / 2, 0.1)
    texture = np.clip(0.8 + (0.2 + 0.5 * d) * _smooth_noise(rng, yy.shape, 12), 0, 1.2)
    return (0.25 + 0.05 * rng.random()) * (1 - 0.65 * d) * blotches * inside * texture


TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    "ground_glass": _ground_glass, "consolidation": _consolidation, "patchy": _patchy}


def add_opacity(image: np.ndarray, yy: np.ndarray, xx: np.ndarray, box: np.ndarray,
                texture: str, d: float, rng: np.random.Generator,
                vessels: np.ndarray | None) -> None:
    """Add one opacity (box ``x, y, w, h`` as fractions of the film) in ``texture``, in place,
    computed on the box's neighbourhood only (its soft edge reaches half a box out)."""
    size = image.shape[0]
    x, y, w, h = (float(v) for v in box)
    rows = slice(max(0, int((y - h / 2) * size)), min(size, int(np.ceil((y + 1.5 * h) * size))))
    cols = slice(max(0, int((x - w / 2) * size)), min(size, int(np.ceil((x + 1.5 * w) * size))))
    hidden = vessels[rows, cols] if vessels is not None else 0.0
    origin = (rows.start / size, cols.start / size, size)
    image[rows, cols] += TEXTURES[texture](yy[rows, cols], xx[rows, cols], (x, y, w, h), d,
                                           rng, hidden, origin)


def correlated_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance pixel noise, blurred over ``sigma`` pixels (0: white, fine grain)."""
    noise = rng.standard_normal((size, size)).astype(np.float32)
    if not sigma:
        return noise
    noise = cv2.GaussianBlur(noise, (0, 0), sigma * size / 1024)
    return noise / max(float(noise.std()), 1e-6)


def develop(image: np.ndarray, style: Style) -> np.ndarray:
    """The style's processing of the film: window and gamma, then blur or edge enhancement."""
    unit = image.shape[0] / 1024
    low, high = style.window
    if (low, high) != (0.0, 1.0) or style.gamma != 1.0:
        image = np.clip((image - low) / (high - low), 0, 1) ** style.gamma
    if style.blur:
        image = cv2.GaussianBlur(image, (0, 0), style.blur * unit)
    if style.unsharp:
        image = image + style.unsharp * (image - cv2.GaussianBlur(image, (0, 0), 3 * unit))
    return image
