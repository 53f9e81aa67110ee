"""Predictions back to a PACS: one DICOM Comprehensive 3D SR (TID 1500) per image.

Built with highdicom. The report holds one image-level group (TID 1501: lung opacity present or
absent, with the image probability) and one planar ROI group (TID 1410) per predicted box: the
box as a closed SCOORD POLYLINE in the source image's own pixel coordinates (column, row; the
top-left corner of the top-left pixel is 0,0, as in the submission), its confidence, the
finding "Opacity" at the finding site "Lung", and the algorithm's name and version. Patient and
study identification are copied from the source file so the SR files with its study: this is
the one output of the project that carries them (``inference.dicom_sr`` is off by default).
UIDs are derived from the source image and the model, so a rerun writes the same UIDs.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import pneumonia_kedro
from pneumonia_kedro.dicom.reader import lenient_values
from pneumonia_kedro.errors import DicomError

ALGORITHM_NAME = "pneumonia-kedro lung opacity detector"  # the version names the architecture
MANUFACTURER = "pneumonia-kedro"
SERIES_NUMBER = 9901  # an SR series number unlikely to collide with the modality's own


def source_header(data: bytes, name: str) -> pydicom.Dataset:
    """The source file's header (no pixel data): the SR's evidence."""
    try:
        with lenient_values():
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:
        raise DicomError(f"{name}: header unreadable for the structured report "
                         f"({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                           "SeriesInstanceUID") if not ds.get(k)]
    if missing:
        raise DicomError(f"{name}: no {', '.join(missing)}: a structured report cannot "
                         "reference this image")
    return ds


def box_polyline(x: float, y: float, width: float, height: float) -> np.ndarray:
    """A closed rectangle (5 points, column/row) from a top-left corner and size."""
    return np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]],
                    dtype=np.float32)


def structured_report(source: pydicom.Dataset, boxes_xywh: Sequence[Sequence[float]],
                      scores: Sequence[float], image_probability: float | None,
                      model_version: str) -> Comprehensive3DSR:
    """The SR for one source image and its post-processed boxes (original pixels)."""
    algorithm = AlgorithmIdentification(name=ALGORITHM_NAME,
                                        family=codes.DCM.ArtificialIntelligence,
                                        version=model_version)
    lung = [FindingSite(codes.SCT.Lung)]
    sop_class, sop_instance = source.SOPClassUID, source.SOPInstanceUID
    entropy = [str(sop_instance), model_version, pneumonia_kedro.__version__]
    present = len(boxes_xywh) > 0
    groups: list = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[*entropy, "image"]), identifier="image"),
        finding_type=codes.DCM.Opacity,
        finding_sites=lung,
        algorithm_id=algorithm,
        qualitative_evaluations=[QualitativeEvaluation(
            codes.DCM.PresenceOfProperty, codes.SCT.Present if present else codes.SCT.Absent)],
        measurements=None if image_probability is None else [
            Measurement(name=codes.DCM.Probability, value=float(image_probability),
                        unit=codes.UCUM.NoUnits, algorithm_id=algorithm)],
        source_images=[SourceImageForMeasurementGroup(sop_class, sop_instance)],
    )]
    for number, (box, score) in enumerate(zip(boxes_xywh, scores, strict=True), start=1):
        region = ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                             graphic_data=box_polyline(*box),
                             source_image=SourceImageForRegion(sop_class, sop_instance))
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[*entropy, f"box {number}"]),
                identifier=f"opacity {number}"),
            referenced_region=region,
            finding_type=codes.DCM.Opacity,
            finding_sites=lung,
            algorithm_id=algorithm,
            measurements=[Measurement(name=codes.DCM.CertaintyOfFinding, value=float(score),
                                      unit=codes.UCUM.NoUnits, algorithm_id=algorithm)],
        ))
    report = MeasurementReport(observation_context=ObservationContext(),
                               procedure_reported=codes.SCT.ChestImaging,
                               imaging_measurements=groups)
    with lenient_values(), warnings.catch_warnings():
        # The competition's PatientName is a bare id; highdicom warns, the SR keeps it.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        sr = Comprehensive3DSR(
            evidence=[source],
            content=report,
            series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
            series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(entropy_srcs=[*entropy, "sr"]),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
        )
    _conform_patient_age(sr)
    return sr


def _conform_patient_age(sr: pydicom.Dataset) -> None:
    """The competition writes PatientAge as a bare number ("54"); an SR must say "054Y"."""
    age = str(sr.get("PatientAge", "") or "").strip()
    if not age or re.fullmatch(r"\d{3}[DWMY]", age):
        return
    if age.isdigit() and int(age) <= 999:
        sr.PatientAge = f"{int(age):03d}Y"
    else:
        del sr.PatientAge  # type 3 in the SR: better absent than invalid


def encode(report: Comprehensive3DSR) -> bytes:
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def boxes_and_scores(rows: pd.DataFrame | None) -> tuple[list, list]:
    """An image's ``xywh`` boxes and scores from its rows of a predictions table (none: no
    boxes)."""
    if rows is None:
        return [], []
    return rows[["x", "y", "width", "height"]].to_numpy().tolist(), rows["score"].tolist()


def report_bytes(source_data: bytes, name: str, boxes_xywh: Sequence[Sequence[float]],
                 scores: Sequence[float], image_probability: float | None,
                 model_version: str) -> bytes:
    """The encoded SR for the source file ``source_data``; ``DicomError`` naming the file when
    its header cannot make one (the caller skips that image, like any per-image problem)."""
    source = source_header(source_data, name)
    try:
        return encode(structured_report(source, boxes_xywh, scores, image_probability,
                                        model_version))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom and pydicom refuse header values an SR cannot carry with these.
        raise DicomError(f"{name}: no structured report: {type(exc).__name__}: {exc}"
                         ) from None
