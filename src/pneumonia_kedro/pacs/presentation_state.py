"""The SR's boxes and scores as a Grayscale Softcopy Presentation State (GSPS), the second
overlay (``deliver.presentation_state``, off by default).

A GSPS carries no pixels: it tells a viewer how to show the source radiograph, here with each
box as a closed POLYLINE graphic and its score as a text annotation, in the source image's own
pixel coordinates (the SR's, so exactly the submission's boxes), on one graphic layer, with
"NOT FOR PRIMARY DIAGNOSIS" in its label, description and as text on the image. It sits in the
source's study and references the source image; viewers that support presentation states
(not all do, hence the Secondary Capture first, see ``overlay.py``) draw it over the original.

Like the other results it is built from the SR: its UIDs are derived from the SR's UID and its
dates are the SR's, so a rerun builds the same bytes and a re-send leaves one copy in the PACS.
"""

from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from pneumonia_kedro.dicom.reader import lenient_values
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.pacs.overlay import NOT_FOR_DIAGNOSIS, Findings, dated_bytes
from pneumonia_kedro.structured_report import ALGORITHM_NAME, MANUFACTURER, source_header
from pneumonia_kedro.structured_report import _conform_patient_age as conform_patient_age

GSPS_SERIES_NUMBER = 9903  # beside the SR's 9901 and the Secondary Capture's 9902
LAYER = "AI_LUNG_OPACITY"
SERIES_DESCRIPTION = "AI lung opacity presentation state - NOT FOR PRIMARY DIAGNOSIS"


def _annotation(source: pydicom.Dataset, findings: Findings, layer: hd.pr.GraphicLayer
                ) -> hd.pr.GraphicAnnotation:
    pixel = hd.pr.AnnotationUnitsValues.PIXEL
    graphics, texts = [], [hd.pr.TextObject(
        NOT_FOR_DIAGNOSIS, units=hd.pr.AnnotationUnitsValues.DISPLAY,
        bounding_box=(0.01, 0.01, 0.6, 0.05), text_justification="LEFT")]
    if findings.probability is not None:
        texts.append(hd.pr.TextObject(
            f"opacity probability {findings.probability:.2f}",
            units=hd.pr.AnnotationUnitsValues.DISPLAY, bounding_box=(0.01, 0.05, 0.6, 0.09),
            text_justification="LEFT"))
    for (x, y, width, height), score in zip(findings.boxes, findings.scores, strict=True):
        corners = np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height],
                            [x, y]], dtype=float)
        graphics.append(hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, corners,
                                            units=pixel))
        texts.append(hd.pr.TextObject(f"{score:.2f}", units=pixel, anchor_point=(x, y),
                                      anchor_point_visible=False))
    return hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                   graphic_objects=graphics or None, text_objects=texts)


def presentation_state(source_data: bytes, name: str, findings: Findings) -> bytes:
    """The GSPS that draws the SR's boxes and scores over its source image."""
    source = source_header(source_data, name)
    if str(source.SOPInstanceUID) != findings.source_uid:
        raise DicomError(f"{name}: the SR describes another image ({findings.source_uid})")
    entropy = [findings.sr_uid, "presentation state"]
    layer = hd.pr.GraphicLayer(LAYER, order=1, description="AI lung opacity boxes and scores")
    with lenient_values(), warnings.catch_warnings():
        # highdicom's warning about an unusual PatientName would quote the name: silence it.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[source],
            series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=generate_uid(entropy_srcs=[*entropy, "instance"]),
            instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=ALGORITHM_NAME[:64], software_versions="1",
            device_serial_number="none", content_label="AI_OPACITY",
            content_description="AI lung opacity - NOT FOR PRIMARY DIAGNOSIS",
            graphic_layers=[layer],
            graphic_annotations=[_annotation(source, findings, layer)])
    gsps.SeriesDescription = SERIES_DESCRIPTION
    conform_patient_age(gsps)
    return dated_bytes(gsps, findings, ("PresentationCreation", "InstanceCreation"))
