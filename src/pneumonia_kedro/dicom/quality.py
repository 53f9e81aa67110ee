"""The input quality gate: is a file what the model was trained for (frontal chest X-rays)?

Each check gives a flag with a reason; a policy per check decides what a flag does:
``warn`` keeps the image and records the flag, ``skip`` leaves the image out (listed with the
reason), ``error`` stops the run naming the file. Header checks read values the decoder has
anyway; the pixel checks are cheap statistics of the converted image, and ``appearance``
(``dicom.appearance``) measures how far the image lies from the training images, whatever its
header says.

Every policy and threshold comes from one parameter group, ``params:quality``
(``conf/base/parameters_quality.yml``, read by ``dicom.quality_settings``): this module holds
no default value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from pneumonia_kedro.dicom.appearance import AppearanceReference, features
from pneumonia_kedro.dicom.reader import DicomImage
from pneumonia_kedro.errors import DicomError

Policy = Literal["warn", "skip", "error"]

# What a chest radiograph comes as: computed or digital radiography, or (as the RSNA
# competition's files) a secondary capture of one.
RADIOGRAPH_MODALITIES = {"CR", "DX"}
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "PORT CHEST", "CHEST_LAT", "TORSO"}
FRONTAL_VIEWS = {"AP", "PA"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "LATERAL LEFT", "LATERAL RIGHT"}


class InputQualityError(DicomError):
    """A file failed a quality check whose policy is ``error``: the run stops."""


@dataclass(frozen=True)
class QualityConfig:
    """One gate: a policy per check and the thresholds of the checks that have one.

    No defaults: ``quality_settings.gate_config`` builds it from ``params:quality``.
    """

    modality: Policy              # Modality not one a chest radiograph comes as (CR, DX)
    sop_class: Policy             # SOP Class not CR, DX or Secondary Capture image storage
    not_chest: Policy             # BodyPartExamined present and not the chest
    lateral_view: Policy          # ViewPosition lateral (LL, RL, ...)
    unknown_view: Policy          # ViewPosition empty or neither AP/PA nor lateral
    colour: Literal["skip", "error"]  # colour or palette: the model needs grayscale
    tiny_image: Policy            # shorter side below min_side pixels
    burned_in_annotation: Policy  # BurnedInAnnotation == YES
    looks_inverted: Policy        # lungs brighter than the mediastinum
    aspect_ratio: Policy          # longer/shorter side above max_aspect_ratio
    near_constant: Policy         # converted pixels (almost) all one grey level
    appearance: Policy            # far from the training images (only with a reference)
    min_side: int
    max_aspect_ratio: float
    near_constant_levels: int     # flagged when the 1st..99th percentile spans fewer levels
    reference: AppearanceReference | None  # None: appearance is not checked (training)

    @property
    def policies(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), str)}

    def as_dict(self) -> dict:
        """JSON-ready: the served model's settings, the cache's fingerprint."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["reference"] = self.reference.as_dict() if self.reference else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> QualityConfig:
        """Back from ``as_dict``; settings saved by older code (a check missing) are refused."""
        missing = sorted({f.name for f in fields(cls)} - set(values))
        if missing:
            raise ValueError(f"the quality gate settings lack {missing}: they were saved by "
                             "an older version; run `kedro run --pipelines evaluate` to "
                             "package the model again")
        reference = values["reference"]
        return cls(**{**values, "reference": AppearanceReference.from_dict(reference)
                      if reference else None})


@dataclass(frozen=True)
class Flag:
    check: str
    reason: str

    def __str__(self) -> str:
        return f"{self.check}: {self.reason}"


def header_flags(image: DicomImage, config: QualityConfig) -> list[Flag]:
    """Flags from the header values and the image's size."""
    flags = []
    modality = image.modality.strip().upper()
    if modality not in RADIOGRAPH_MODALITIES:
        flags.append(Flag("modality", f"Modality {modality or '(empty)'}: the model knows "
                                      "chest radiographs (CR, DX)"))
    sop_class = image.sop_class.strip()
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        flags.append(Flag("sop_class", f"SOP Class {sop_class or '(empty)'} is not a "
                                       "radiograph (CR, DX or secondary capture image "
                                       "storage)"))
    body_part = image.body_part.strip().upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        flags.append(Flag("not_chest", f"BodyPartExamined is {body_part}, not the chest"))
    view = image.view_position.strip().upper()
    if view in LATERAL_VIEWS:
        flags.append(Flag("lateral_view", f"ViewPosition {view}: the model knows AP and PA"))
    elif view not in FRONTAL_VIEWS:
        flags.append(Flag("unknown_view", f"ViewPosition {view or '(empty)'} is neither AP "
                                          "nor PA"))
    if image.burned_in_annotation.strip().upper() == "YES":
        flags.append(Flag("burned_in_annotation", "BurnedInAnnotation is YES: text in the "
                                                  "pixels"))
    shorter, longer = sorted((image.height, image.width))
    if shorter < config.min_side:
        flags.append(Flag("tiny_image", f"{image.width}x{image.height} pixels, shorter side "
                                        f"below {config.min_side}"))
    if longer > config.max_aspect_ratio * shorter:
        flags.append(Flag("aspect_ratio", f"{image.width}x{image.height}: aspect ratio "
                                          f"{longer / shorter:.2f} above "
                                          f"{config.max_aspect_ratio}"))
    return flags


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """Every n-th pixel, about 256 on the longer side: statistics of the whole image at a
    sixteenth of the cost (the gate runs on every cached image)."""
    step = max(1, max(pixels.shape) // 256)
    return pixels[::step, ::step]


def grey_level_span(image: DicomImage) -> int:
    """Grey levels between the 1st and 99th percentile of the non-padding pixels."""
    pixels = _thumbnail(image.pixels)
    if image.padding is not None and image.padding.shape == image.pixels.shape:
        pixels = pixels[~_thumbnail(image.padding)]
    if pixels.size == 0:
        return 0
    # A histogram of 256 grey levels instead of a sort.
    cumulative = np.cumsum(np.bincount(pixels.ravel(), minlength=256))
    low, high = np.searchsorted(cumulative, [0.01 * pixels.size, 0.99 * pixels.size])
    return int(high - low)


def inversion_contrast(pixels: np.ndarray) -> float:
    """Mean grey level of the mediastinum minus that of the two lung fields.

    On a frontal chest X-ray with air dark, the central column (mediastinum, spine) is
    brighter than the mid-lateral fields (lungs), so the value is positive; an image whose
    photometric interpretation is wrong gives a clearly negative one.
    """
    height, width = pixels.shape
    rows = slice(int(0.30 * height), int(0.65 * height))
    centre = pixels[rows, int(0.44 * width):int(0.56 * width)]
    lungs = np.concatenate([
        pixels[rows, int(0.18 * width):int(0.35 * width)].ravel(),
        pixels[rows, int(0.65 * width):int(0.82 * width)].ravel(),
    ])
    if centre.size == 0 or lungs.size == 0:
        return 0.0
    return float(centre.mean()) - float(lungs.mean())


# Lungs must be this many grey levels brighter than the mediastinum to call an image inverted:
# a white-out (both lungs opaque) brings them close, but not above.
INVERSION_MARGIN = 10.0


def pixel_flags(image: DicomImage, config: QualityConfig) -> list[Flag]:
    """Flags from the converted pixels: near-constant or looking inverted, and far from the
    training images (when the gate has a reference)."""
    flags = []
    span = grey_level_span(image)
    if span < config.near_constant_levels:
        flags.append(Flag("near_constant", f"converted image is nearly constant (1st..99th "
                                           f"percentile span {span} grey levels)"))
    elif (contrast := inversion_contrast(_thumbnail(image.pixels))) < -INVERSION_MARGIN:
        flags.append(Flag("looks_inverted", f"lung fields {-contrast:.0f} grey levels brighter "
                                            "than the mediastinum: photometric "
                                            "interpretation may be wrong"))
    reference = config.reference
    if reference is not None:
        distance = reference.distance(features(image.pixels))
        if distance > reference.threshold:
            flags.append(Flag("appearance", f"appearance distance {distance:.2f} from the "
                                            f"training images, above {reference.threshold:.2f}"
                                            ": not like the chest X-rays the model was trained "
                                            "on"))
    return flags


@dataclass(frozen=True)
class GateResult:
    """What the gate decided: ``skip_reason`` is set when the image must be left out."""

    flags: tuple[Flag, ...]
    skip_reason: str = ""

    @property
    def flag_text(self) -> str:
        return "; ".join(str(flag) for flag in self.flags)


def apply_policies(flags: list[Flag], config: QualityConfig, name: str) -> GateResult:
    """Raise for an ``error`` flag; otherwise say whether the image is skipped."""
    policies = config.policies
    for flag in flags:
        if policies[flag.check] == "error":
            raise InputQualityError(f"{name}: quality gate {flag} (policy error)")
    skipped = [flag for flag in flags if policies[flag.check] == "skip"]
    reason = f"{name}: " + "; ".join(f"quality gate {flag}" for flag in skipped) \
        if skipped else ""
    return GateResult(flags=tuple(flags), skip_reason=reason)


def check(image: DicomImage, config: QualityConfig, name: str) -> GateResult:
    """Every check on one decoded image, with the policies applied."""
    return apply_policies(header_flags(image, config) + pixel_flags(image, config), config,
                          name)


def colour_result(error: DicomError, config: QualityConfig, name: str) -> GateResult:
    """A colour image the decoder refused: skipped, or the run stops (policy error)."""
    return apply_policies([Flag("colour", str(error).removeprefix(f"{name}: "))], config, name)
