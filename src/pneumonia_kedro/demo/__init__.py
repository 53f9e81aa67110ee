"""A demo dataset in the competition's exact layout: real label geometry, synthetic pixels.

Patients, boxes, view positions, ages, sexes and pixel spacings come from the real stage-2
tables when they are available (``torchxrayvision`` ships them); otherwise from distributions
fitted to the same tables (see ``shared/reference/rsna.md``). Pixels are a synthetic chest:
body, lung fields, ribs, mediastinum, noise, and an opacity texture inside every box. Files are
1024x1024 MONOCHROME2 8-bit JPEG Baseline Secondary Capture DICOMs, like the competition's.
The same seed gives byte-identical files.

Two independent axes shape the pixels. ``difficulty`` (0..1) says how hard a film is: faint,
ill-defined opacities, varying exposure and body position, devices, markers and other
findings on negatives. ``style`` says how it looks, so a recipe can be checked on more than
one generator's images (``styles.STYLES``):

- ``classic``: the original look, byte for byte (a filled, mottled cloud in each box);
- ``ground_glass``: a faint hazy fill with soft edges through which vessel markings still
  show; a softer, brighter film with coarse grain and a narrower, taller chest;
- ``consolidation``: a dense, sharp-edged fill that hides the vessels, crossed by lucent
  branching airways (air bronchograms); an edge-enhanced, high-contrast film with fine noise
  and a broader chest;
- ``patchy``: several low-contrast blotches inside the box rather than one shape; a flat,
  slightly soft film with coarse mottled noise.

Every style gives the same patients, boxes and splits for the same seed and difficulty.

Modules: ``settings`` (``DemoConfig``), ``patients`` (label geometry), ``render`` (the chest),
``styles`` (the looks), ``distractors`` (findings, devices, markers), ``encoding`` (DICOM).
"""

from .encoding import SECONDARY_CAPTURE, competition_dicom, demo_file, dicom_bytes, encode_jpeg
from .patients import (
    BOXES_PER_IMAGE,
    HEADER_COLUMNS,
    P_AP_NEGATIVE,
    P_AP_POSITIVE,
    P_NORMAL_GIVEN_NEGATIVE,
    sample_demo_patients,
)
from .render import render_chest
from .settings import IMAGE_SIZE, DemoConfig, StyleName
from .styles import STYLES, Style, style_named

__all__ = [
    "BOXES_PER_IMAGE", "HEADER_COLUMNS", "IMAGE_SIZE", "P_AP_NEGATIVE", "P_AP_POSITIVE",
    "P_NORMAL_GIVEN_NEGATIVE", "SECONDARY_CAPTURE", "STYLES", "DemoConfig", "Style",
    "StyleName", "competition_dicom", "demo_file", "dicom_bytes", "encode_jpeg",
    "render_chest", "sample_demo_patients", "style_named",
]
