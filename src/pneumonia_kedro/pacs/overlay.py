"""Results a radiologist sees: the SR's boxes and scores as a derived Secondary Capture image.

Every viewer shows an image, while few draw a third party's TID 1500 SR (and support for
Presentation States varies), so the first overlay is a Secondary Capture: the source
radiograph with each box (yellow, drawn inside its edges, so its outer border is the box
rounded to whole pixels: within half a pixel of the submission) and its score (cyan) burned
in, in the source's study, marked as derived (``ImageType`` DERIVED\\SECONDARY, a Source Image
Sequence pointing at the radiograph) and as not for primary diagnosis (in the series
description, the image comments and burned into the pixels). ``presentation_state.py`` gives
the same boxes as a GSPS for viewers that draw one (``deliver.presentation_state``, off by
default).

The overlay is built from the SR, not from the predictions: its boxes are the SR's, and its
UIDs are derived from the SR's UID (itself derived from the source image and the model), so a
rerun builds the same objects and a re-send leaves one copy in the PACS.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pneumonia_kedro.dicom.reader import decode, lenient_values
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.structured_report import MANUFACTURER, source_header

BOX_COLOUR = (255, 255, 0)  # yellow: never a grey level, so box pixels can be found exactly
TEXT_COLOUR = (0, 255, 255)  # cyan: never yellow either
NOT_FOR_DIAGNOSIS = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"
SERIES_DESCRIPTION = "AI lung opacity overlay - NOT FOR PRIMARY DIAGNOSIS"
SC_SERIES_NUMBER = 9902  # beside the SR's 9901


@dataclass(frozen=True)
class Findings:
    """What an SR says about one image: its boxes (``xywh``, source pixels) and scores."""

    sr_uid: str
    source_uid: str
    boxes: tuple[tuple[float, float, float, float], ...]
    scores: tuple[float, ...]
    probability: float | None
    content_date: str
    content_time: str


def findings_from_sr(data: bytes, name: str) -> Findings:
    """Read the boxes and scores back from one of the project's TID 1500 SRs."""
    try:
        sr = hd.sr.srread(io.BytesIO(data))
        groups = sr.content.get_planar_roi_measurement_groups()
        image_groups = sr.content.get_image_measurement_groups()
    except Exception as exc:
        raise DicomError(f"{name}: not a readable TID 1500 SR ({type(exc).__name__}: "
                         f"{exc})") from None
    boxes, scores = [], []
    for group in groups:
        points = np.asarray(group.roi.value, dtype=float)
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        boxes.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
        certainty = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        scores.append(float(certainty[0].value) if certainty else float("nan"))
    probability = None
    for group in image_groups:
        found = group.get_measurements(name=codes.DCM.Probability)
        if found:
            probability = float(found[0].value)
    source = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return Findings(sr_uid=str(sr.SOPInstanceUID),
                    source_uid=str(source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
                    boxes=tuple(boxes), scores=tuple(scores), probability=probability,
                    content_date=str(sr.get("ContentDate", "")),
                    content_time=str(sr.get("ContentTime", "")))


def pixel_box(box: tuple[float, float, float, float], rows: int, columns: int
              ) -> tuple[int, int, int, int]:
    """The box's edges on the pixel grid (x0, y0, x1, y1; ends exclusive), each within half a
    pixel of the float box and inside the image."""
    x, y, width, height = box
    edges = np.floor(np.array([x, y, x + width, y + height]) + 0.5).astype(int)
    x0, x1 = np.clip(edges[[0, 2]], 0, columns)
    y0, y1 = np.clip(edges[[1, 3]], 0, rows)
    return int(x0), int(y0), int(x1), int(y1)


def line_thickness(rows: int, columns: int) -> int:
    """Visible once a viewer fits the image to its window: 2 px at 1024."""
    return max(1, round(max(rows, columns) / 512))


def draw(grey: np.ndarray, findings: Findings) -> np.ndarray:
    """An RGB image: the text first, then the boxes over it, so that the yellow pixels are
    exactly the boxes' borders."""
    rows, columns = grey.shape
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    scale = max(rows, columns) / 1024
    font, size, weight = cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, max(1, round(2 * scale))
    lines = [NOT_FOR_DIAGNOSIS]
    if findings.probability is not None:
        lines.append(f"opacity probability {findings.probability:.2f}")
    for number, line in enumerate(lines, start=1):
        cv2.putText(rgb, line, (int(10 * scale), int(30 * scale * number)), font, size,
                    TEXT_COLOUR, weight, cv2.LINE_8)
    boxes = [pixel_box(box, rows, columns) for box in findings.boxes]
    for (x0, y0, _, _), score in zip(boxes, findings.scores, strict=True):
        cv2.putText(rgb, f"{score:.2f}", (x0, max(y0 - int(6 * scale), int(20 * scale))),
                    font, size, TEXT_COLOUR, weight, cv2.LINE_8)
    thickness = line_thickness(rows, columns)
    for x0, y0, x1, y1 in boxes:
        if x1 <= x0 or y1 <= y0:
            continue
        for t in range(min(thickness, (x1 - x0 + 1) // 2, (y1 - y0 + 1) // 2)):
            rgb[y0 + t, x0:x1] = BOX_COLOUR
            rgb[y1 - 1 - t, x0:x1] = BOX_COLOUR
            rgb[y0:y1, x0 + t] = BOX_COLOUR
            rgb[y0:y1, x1 - 1 - t] = BOX_COLOUR
    return rgb


def _orientation(source: pydicom.Dataset) -> tuple[str, str]:
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    # A chest AP/PA radiograph is displayed with the patient's left on the viewer's right.
    return "L", "F"


def secondary_capture(source_data: bytes, name: str, findings: Findings) -> bytes:
    """The derived Secondary Capture of one source image with the SR's boxes burned in."""
    source = source_header(source_data, name)
    image = decode(source_data, name)
    if str(source.SOPInstanceUID) != findings.source_uid:
        raise DicomError(f"{name}: the SR describes another image ({findings.source_uid})")
    entropy = [findings.sr_uid, "secondary capture"]
    with lenient_values(), warnings.catch_warnings():
        # highdicom's warning about an unusual PatientName would quote the name: silence it.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=draw(image.pixels, findings),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=generate_uid(entropy_srcs=[*entropy, "instance"]),
            instance_number=1, manufacturer=MANUFACTURER,
            patient_orientation=_orientation(source),
            pixel_spacing=_spacing(source))
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.ImageComments = (f"{NOT_FOR_DIAGNOSIS}. Derived from the source radiograph: boxes and "
                        "scores of an AI lung opacity detector burned in.")
    sc.DerivationDescription = "AI lung opacity boxes and scores burned into the source image"
    sc.BurnedInAnnotation = "YES"
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    if findings.content_date and findings.content_time:
        sc.DateOfSecondaryCapture = findings.content_date
        sc.TimeOfSecondaryCapture = findings.content_time
    return dated_bytes(sc, findings, ("Content", "InstanceCreation"))


def dated_bytes(dataset: pydicom.Dataset, findings: Findings, prefixes: tuple[str, ...]
                ) -> bytes:
    """``dataset`` as a file, its ``<prefix>Date``/``Time`` and contribution times set to the
    SR's: the same SR gives the same bytes, whenever the object is built."""
    date, time = findings.content_date, findings.content_time
    if date and time:
        for prefix in prefixes:
            setattr(dataset, f"{prefix}Date", date)
            setattr(dataset, f"{prefix}Time", time)
        for item in dataset.get("ContributingEquipmentSequence", []):
            if "ContributionDateTime" in item:
                item.ContributionDateTime = date + time
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _spacing(source: pydicom.Dataset) -> tuple[float, float] | None:
    value = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    try:
        return (float(value[0]), float(value[1])) if value and len(value) == 2 else None
    except (TypeError, ValueError):
        return None
