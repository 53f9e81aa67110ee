"""The synthetic chest radiograph: anatomy, opacities, distractors and film, per style."""

from __future__ import annotations

import numpy as np

from pneumonia_kedro.labels import NEGATIVE_CLASSES

from .distractors import _devices_and_markers, _findings
from .patients import P_NORMAL_GIVEN_NEGATIVE
from .settings import IMAGE_SIZE
from .shapes import _ellipse, _rng, _smooth_noise
from .styles import Style, add_opacity, correlated_noise, develop, style_named, vessel_markings


def render_chest(patient_id: str, view_position: str, boxes_xywh: object, seed: int,
                 size: int = IMAGE_SIZE, difficulty: float = 0.0,
                 detailed_class: str | None = None, style: str | Style = "classic") -> np.ndarray:
    """A synthetic chest radiograph (uint8, ``size`` x ``size``) with opacities in the boxes.

    ``difficulty`` 0 gives clear, well-defined opacities on a standard chest. Towards 1 the
    realism pass makes it as hard as the task: faint, ill-defined, patchy opacities; body
    size, position, exposure, contrast and noise that vary per image; support devices, lines
    and text markers; and negatives of the "No Lung Opacity / Not Normal" class carrying
    other findings (a large heart, effusions, nodules, scars) that a detector must not box.
    ``style`` (``styles.STYLES``) changes how the film looks, not how hard it is.
    """
    look = style if isinstance(style, Style) else style_named(style)
    rng = _rng(seed, patient_id)
    d = float(difficulty)
    # Its own stream: difficulty 0 draws nothing from it, so those files stay as they were.
    realism = _rng(seed, patient_id, "realism")
    # The style's draws (vessels, textures) have a third stream: anatomy and difficulty
    # draw the same numbers in every style.
    styling = _rng(seed, patient_id, "style", look.name)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    jitter = rng.normal(0, 0.015, size=6)
    pose = (1 + d * realism.uniform(-0.15, 0.15), *realism.normal(0, 0.03 * d, 2)) \
        if d else (1.0, 0.0, 0.0)
    boxes = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4) / size
    not_normal = d > 0 and not len(boxes) and (
        detailed_class == NEGATIVE_CLASSES[0] if detailed_class is not None
        else realism.random() > P_NORMAL_GIVEN_NEGATIVE)
    findings = set(realism.choice(["heart", "effusion", "nodules", "scar"], size=2,
                                  replace=False)) if not_normal else set()
    image, lungs, hila = _chest(yy, xx, jitter, pose, view_position == "AP",
                                "heart" in findings, look)
    vessels = vessel_markings(lungs, hila, look.vessels, styling) if look.vessels else None
    if vessels is not None:
        image += vessels
    for box in boxes:
        if look.texture == "cloud":
            _cloud(image, yy, xx, box, d, rng)
        else:
            add_opacity(image, yy, xx, box, look.texture, d, styling, vessels)
    if findings:
        image += _findings(findings, yy, xx, lungs, pose[2], realism) * min(1.0, 0.4 + d)
    if d:
        image += _devices_and_markers(size, d, realism)
    if view_position == "AP":
        image = 0.9 * image + 0.05  # portable AP films: lower contrast
        image[int(0.05 * size):int(0.09 * size), int(0.85 * size):int(0.92 * size)] = 0.95
    if d:  # exposure and contrast of this film
        gamma = float(np.exp(realism.normal(0, 0.25 * d)))
        contrast = 1 + d * realism.uniform(-0.3, 0.15)
        image = (np.clip(image, 0, 1) ** gamma - 0.5) * contrast + 0.5 \
            + realism.normal(0, 0.04 * d)
    return _film(image, d, rng, realism, look)


def _chest(yy: np.ndarray, xx: np.ndarray, jitter: np.ndarray, pose: tuple, ap: bool,
           large_heart: bool, look: Style) -> tuple[np.ndarray, np.ndarray, list]:
    """Body, lung fields, ribs, mediastinum, heart and diaphragm in the style's proportions;
    returns the image, the lung mask and each hilum (x, y, lung height in pixels)."""
    scale, dx, dy = pose
    size = yy.shape[0]
    image = np.full((size, size), 0.06, dtype=np.float32)
    body = _ellipse(yy, xx, 0.55 + jitter[0] + dy, 0.5 + dx, 0.62 * scale,
                    (0.47 + jitter[1]) * scale * look.body_width, 0.05)
    image += 0.38 * body
    lung_ry = (0.30 + jitter[2]) * scale * look.lung_height
    lung_rx = (0.16 + jitter[3]) * scale * look.lung_width
    lung_dx = (0.20 - jitter[4]) * scale * look.lung_spacing
    lungs = np.maximum(
        _ellipse(yy, xx, 0.47 + dy, 0.5 - lung_dx + dx, lung_ry, lung_rx, 0.12),
        _ellipse(yy, xx, 0.47 + dy, 0.5 + lung_dx + dx, lung_ry, lung_rx, 0.12),
    )
    image -= 0.26 * lungs
    # Ribs: bright bands that curve down across each lung field.
    ribs = 11.0 / look.rib_spacing
    rib_phase = ((yy - dy) * ribs / scale - 1.8 * (xx - 0.5 - dx) ** 2 * ribs) % 1.0
    image += 0.07 * lungs * np.exp(-(((rib_phase - 0.5) / 0.09) ** 2))
    # Mediastinum and heart: wider on AP (magnified by the projection), narrower on PA.
    heart_rx = (0.13 if ap else 0.10) * look.mediastinum_width \
        * (1.45 if large_heart else 1.0) * scale
    image += 0.30 * _ellipse(yy, xx, 0.40 + dy, 0.5 + dx, 0.30 * scale,
                             0.055 * look.mediastinum_width * scale, 0.3)
    image += 0.25 * _ellipse(yy, xx, 0.66 + dy, 0.53 + jitter[5] + dx, 0.13 * scale, heart_rx,
                             0.25)
    image += 0.30 * np.clip((yy - 0.80 - dy - 0.05 * np.abs(xx - 0.5)) * 6, 0, 1) * body
    hila = [(float((0.5 + side * (lung_dx - 0.55 * lung_rx) + dx) * size),
             float((0.50 + dy) * size), float(2 * lung_ry * size)) for side in (-1, 1)]
    return image, lungs, hila


def _cloud(image: np.ndarray, yy: np.ndarray, xx: np.ndarray, box: np.ndarray, d: float,
           rng: np.random.Generator) -> None:
    """The classic opacity: a patchy consolidation that fills its box, well defined at
    difficulty 0, faint, ill-defined and patchy towards 1 (added in place)."""
    x, y, w, h = box
    size = image.shape[0]
    cloud = _ellipse(yy, xx, y + h / 2, x + w / 2, h / 2, w / 2, 0.15 + 0.45 * d)
    texture = (0.7 - 0.5 * d) + (0.3 + 0.6 * d) * _smooth_noise(rng, (size, size), 24)
    image += (0.26 + 0.06 * rng.random()) * (1 - 0.65 * d) * cloud * np.clip(texture, 0, 1.2)


def _film(image: np.ndarray, d: float, rng: np.random.Generator,
          realism: np.random.Generator, look: Style) -> np.ndarray:
    """Grain and pixel noise, then the style's processing, as uint8 grey levels."""
    size = image.shape[0]
    image += look.grain * _smooth_noise(rng, (size, size), look.grain_cells)
    noise = look.noise * (1 + 2 * d * realism.random()) if d else look.noise
    image += noise * correlated_noise(rng, size, look.noise_blur)
    image = develop(image, look)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
