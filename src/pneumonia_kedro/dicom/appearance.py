"""The header-free check: how far an image lies from the training images.

Headers can be wrong or missing (a CT slice without BodyPartExamined, a test pattern saved as
a chest radiograph), so the quality gate also looks at the pixels. Each image becomes a small
vector of appearance features (its grey levels on a 16 x 16 grid and a 16-bin histogram,
both of a 64 x 64 area-averaged copy, so the full-size image and its cached copy give the
same vector). The training images' vectors define the reference: their mean and main
directions of variation (PCA). An image's distance is the root mean square of its
standardised coordinates along those directions and of its standardised remainder outside
them: about 1 for a typical training image, large for anything else.

The threshold comes from the training images' own distribution: each half of them is scored
against a reference fitted on the other half (so no image is scored by a fit that saw it), the
``quantile`` of those distances is taken and multiplied by ``margin``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

FEATURES_VERSION = 1  # bump when ``features`` changes: older references are refused
GRID, WORK, BINS = 16, 64, 16
MIN_IMAGES = 8  # fewer training images give no usable reference


class AppearanceError(ValueError):
    """A reference that cannot be used (made by another version of the features)."""


def features(pixels: np.ndarray) -> np.ndarray:
    """The appearance vector of one uint8 image (its content, without letterbox padding)."""
    work = cv2.resize(np.ascontiguousarray(pixels, dtype=np.uint8), (WORK, WORK),
                      interpolation=cv2.INTER_AREA)
    grid = cv2.resize(work, (GRID, GRID), interpolation=cv2.INTER_AREA)
    histogram = np.bincount((work // (256 // BINS)).ravel(), minlength=BINS) / work.size
    return np.concatenate([grid.ravel() / 255.0, histogram]).astype(np.float64)


@dataclass(frozen=True)
class AppearanceReference:
    """The training images' appearance: mean, main directions with their spreads, the spread
    of what the directions leave out, and the distance above which an image is flagged."""

    mean: tuple[float, ...]
    directions: tuple[tuple[float, ...], ...]
    spreads: tuple[float, ...]
    remainder_spread: float
    threshold: float
    images: int
    version: int

    def distance(self, vector: np.ndarray) -> float:
        return float(_distances(np.asarray(vector)[None], _arrays(self))[0])

    def as_dict(self) -> dict:
        """JSON-ready (lists, not tuples): what the JSON dataset and the model package hold."""
        values = asdict(self)
        values["directions"] = [list(row) for row in self.directions]
        return {**values, "mean": list(self.mean), "spreads": list(self.spreads)}

    @classmethod
    def from_dict(cls, values: dict) -> AppearanceReference:
        if values.get("version") != FEATURES_VERSION:
            raise AppearanceError(
                f"appearance reference of features version {values.get('version')}, this "
                f"code computes version {FEATURES_VERSION}: rebuild it with `kedro run "
                "--pipelines cache` (and re-run evaluate to package the served model)")
        return cls(mean=tuple(values["mean"]),
                   directions=tuple(tuple(row) for row in values["directions"]),
                   spreads=tuple(values["spreads"]),
                   remainder_spread=float(values["remainder_spread"]),
                   threshold=float(values["threshold"]), images=int(values["images"]),
                   version=int(values["version"]))


def _fit(vectors: np.ndarray, components: int) -> tuple[np.ndarray, ...]:
    mean = vectors.mean(axis=0)
    centred = vectors - mean
    _, singular, rows = np.linalg.svd(centred, full_matrices=False)
    k = max(1, min(components, len(vectors) - 2))
    spreads = np.maximum(singular[:k] / np.sqrt(len(vectors) - 1), 1e-6)
    directions = rows[:k]
    remainder = centred - centred @ directions.T @ directions
    remainder_spread = max(float(np.sqrt((remainder ** 2).sum(axis=1).mean())), 1e-6)
    return mean, directions, spreads, np.float64(remainder_spread)


def _arrays(reference: AppearanceReference) -> tuple[np.ndarray, ...]:
    return (np.asarray(reference.mean), np.asarray(reference.directions),
            np.asarray(reference.spreads), np.float64(reference.remainder_spread))


def _distances(vectors: np.ndarray, fitted: tuple[np.ndarray, ...]) -> np.ndarray:
    mean, directions, spreads, remainder_spread = fitted
    centred = vectors - mean
    along = centred @ directions.T
    remainder = centred - along @ directions
    squares = ((along / spreads) ** 2).sum(axis=1) \
        + (remainder ** 2).sum(axis=1) / remainder_spread ** 2
    return np.sqrt(squares / (len(spreads) + 1))


def held_out_distances(vectors: np.ndarray, components: int) -> np.ndarray:
    """Each image's distance from a reference fitted on the other half of the images."""
    halves = np.arange(len(vectors)) % 2 == 0
    distances = np.empty(len(vectors))
    for scored in (halves, ~halves):
        distances[scored] = _distances(vectors[scored], _fit(vectors[~scored], components))
    return distances


def calibrate(vectors: np.ndarray, components: int, quantile: float, margin: float
              ) -> tuple[AppearanceReference, np.ndarray]:
    """The reference of the training images' ``vectors`` and each image's held-out distance.

    Raises ``ValueError`` with fewer than ``MIN_IMAGES`` images."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) < MIN_IMAGES:
        raise ValueError(f"{len(vectors)} training image(s); the appearance reference needs "
                         f"at least {MIN_IMAGES}")
    held_out = held_out_distances(vectors, components)
    threshold = float(np.quantile(held_out, quantile)) * margin
    mean, directions, spreads, remainder_spread = _fit(vectors, components)
    reference = AppearanceReference(
        mean=tuple(mean.round(6).tolist()),
        directions=tuple(tuple(row) for row in directions.round(6).tolist()),
        spreads=tuple(spreads.round(8).tolist()), remainder_spread=float(remainder_spread),
        threshold=round(threshold, 6), images=len(vectors), version=FEATURES_VERSION)
    return reference, held_out
