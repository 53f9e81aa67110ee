"""DICOM in: decoding files to uint8 images (``reader``, ``luts``), folders of files
(``folder``) and the input quality gate (``quality``). No Kedro imports."""

from pneumonia_kedro.dicom.folder import DicomFolder, header_table
from pneumonia_kedro.dicom.luts import to_display_uint8
from pneumonia_kedro.dicom.reader import (
    HEADER_FIELDS,
    ColourImageError,
    DicomImage,
    decode,
    lenient_values,
    read_header,
)

__all__ = ["HEADER_FIELDS", "ColourImageError", "DicomFolder", "DicomImage", "decode",
           "header_table", "lenient_values", "read_header", "to_display_uint8"]
