"""Demo pixels as competition-like DICOM files: JPEG Baseline Secondary Capture."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, JPEGBaseline8Bit, generate_uid

from pneumonia_kedro.dicom import lenient_values

from .render import render_chest
from .settings import DemoConfig

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG bytes of a uint8 grayscale image (libjpeg-turbo through Pillow)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=quality,
                                          optimize=False, progressive=False)
    return buffer.getvalue()


def _uid(seed: int, patient_id: str, kind: str) -> str:
    return generate_uid(entropy_srcs=[str(seed), patient_id, kind])


def competition_dicom(patient_id: str, pixels: np.ndarray, header: dict, seed: int,
                      jpeg_quality: int = 92) -> Dataset:
    """A DICOM dataset shaped like the competition's files, pixels JPEG Baseline encoded."""
    sop_instance = _uid(seed, patient_id, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {header['view_position']}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = header["patient_sex"]
    with lenient_values():  # the competition writes a bare number, not "054Y"
        ds.PatientAge = str(int(header["patient_age"]))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = header["view_position"]
    ds.StudyInstanceUID = _uid(seed, patient_id, "study")
    ds.SeriesInstanceUID = _uid(seed, patient_id, "series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    spacing = f"{float(header['pixel_spacing']):.6g}"
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([encode_jpeg(pixels, jpeg_quality)])
    ds["PixelData"].VR = "OB"
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """Serialise ``ds`` as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def demo_file(patient_id: str, header: dict, boxes_xywh: object, config: DemoConfig) -> bytes:
    """The bytes of one demo DICOM file."""
    pixels = render_chest(patient_id, header["view_position"], boxes_xywh, config.seed,
                          difficulty=config.difficulty,
                          detailed_class=header.get("detailed_class"), style=config.style)
    return dicom_bytes(competition_dicom(patient_id, pixels, header, config.seed,
                                         config.jpeg_quality))
