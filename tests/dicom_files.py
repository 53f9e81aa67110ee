"""Small DICOM files written by pydicom for the conversion, gate and SR tests."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def native_dicom(pixels: np.ndarray, *, bits_stored: int | None = None,
                 photometric: str = "MONOCHROME2", raw_words: np.ndarray | None = None,
                 **attributes: object) -> bytes:
    """An uncompressed single-frame grayscale file holding ``pixels`` (int array).

    ``raw_words`` replaces the pixel data's stored words (e.g. with garbage in unused bits).
    Any other keyword becomes a DICOM attribute (``VOILUTSequence`` may be a list of dicts).
    """
    signed = bool(pixels.min() < 0)
    bits_allocated = 8 if pixels.dtype == np.uint8 else 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CR", "p1", "Test^Patient"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in attributes.items():
        if keyword in ("VOILUTSequence", "ModalityLUTSequence"):
            items = []
            for entry in value:
                item = Dataset()
                for key, item_value in entry.items():
                    if key in ("LUTData", "LUTDescriptor"):  # VR "US or OW": say which
                        vr = "OW" if isinstance(item_value, bytes) else "US"
                        item.add_new(key, vr, item_value)
                    else:
                        setattr(item, key, item_value)
                items.append(item)
            setattr(ds, keyword, Sequence(items))
        else:
            setattr(ds, keyword, value)
    stored = pixels if raw_words is None else raw_words
    dtype = {(8, False): "<u1", (16, False): "<u2", (16, True): "<i2"}[(bits_allocated, signed)]
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
