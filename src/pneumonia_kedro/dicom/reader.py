"""DICOM files to uint8 grayscale images.

pydicom's public API parses every file (``benchmarks/header_speed.py`` measured what a reader
of its own would save). Competition files (8-bit MONOCHROME2 JPEG Baseline) then take a fast
path: the encapsulated JPEG frame goes straight to libjpeg-turbo (OpenCV), four times faster
than pydicom's default plugins. Everything else goes through pydicom's decoders and
``luts.to_display_uint8``: padding, modality LUT, VOI LUT or the first window, and
MONOCHROME1 inverted so that air is dark as in the training data.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
import pydicom.config
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from pneumonia_kedro.dicom.luts import to_display_uint8
from pneumonia_kedro.errors import DicomError

logger = logging.getLogger(__name__)

# Which package decodes which transfer syntax when pydicom finds no plugin.
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pillow or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pillow or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
}
# Non-identifying header values the project keeps; names, birth dates, other IDs and
# institutions are never read into any output.
HEADER_FIELDS = {
    "view_position": "ViewPosition",
    "patient_sex": "PatientSex",
    "patient_age": "PatientAge",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "burned_in_annotation": "BurnedInAnnotation",
}

# Largest image accepted (8192 x 8192): projection X-rays stay far below it, and decoders
# allocate what a header claims, so a damaged or hostile header must not be believed.
MAX_IMAGE_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class DicomImage:
    """One decoded image: uint8 pixels (air dark) and what it came from.

    ``height`` and ``width`` are the file's; ``pixels`` may be smaller when the decoder was
    allowed to reduce (JPEG DCT scaling), covering the same field of view. ``padding`` marks
    pixel padding (detector borders, now 0) when the file declares it; the header values are
    what the input quality gate checks.
    """

    pixels: np.ndarray
    view_position: str
    transfer_syntax: str
    height: int
    width: int
    body_part: str = ""
    burned_in_annotation: str = ""
    padding: np.ndarray | None = None
    modality: str = ""
    sop_class: str = ""  # SOPClassUID, else the file meta's MediaStorageSOPClassUID


class ColourImageError(DicomError):
    """A colour or palette image: the input quality gate decides between skip and error."""


@contextmanager
def lenient_values() -> Iterator[None]:
    """Accept non-conformant values such as the competition's bare-number PatientAge ("54")."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


# A deflated file inflates in memory before it is parsed: a few kB can claim gigabytes.
# Room for a 16-bit image of the largest size and its header.
MAX_INFLATED_BYTES = 2 * MAX_IMAGE_PIXELS + 64 * 2**20


def _check_inflated_size(data: bytes, name: str) -> None:
    if DeflatedExplicitVRLittleEndian.encode("ascii") not in data[:1024]:
        return  # not a deflated file (its transfer syntax sits in the first few hundred bytes)
    stream = io.BytesIO(data)
    try:  # leaves the stream where the file meta group (0002,xxxx) ends
        read_preamble(stream, False)
        read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                     stop_when=lambda tag, vr, length: tag >> 16 != 2)
    except Exception:
        return  # pydicom's own parse reports the damage
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(data[stream.tell():], MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise DicomError(f"{name}: deflated data is damaged ({exc})") from None
    if inflater.unconsumed_tail:
        raise DicomError(f"{name}: deflated data inflates to more than "
                         f"{MAX_INFLATED_BYTES // 2**20} MiB")


def _parse(data: bytes, name: str, stop_before_pixels: bool = False) -> pydicom.Dataset:
    if len(data) == 0:
        raise DicomError(f"{name}: empty file (0 bytes)")
    _check_inflated_size(data, name)
    # pydicom warns (once per process) instead of failing on some damage; over thousands of
    # files the warning would name none of them, so it becomes this file's error or a log line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
        except InvalidDicomError as exc:
            raise DicomError(f"{name}: not a DICOM file ({exc})") from None
        except Exception as exc:  # pydicom raises many types on damaged files
            raise DicomError(f"{name}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
    for warning in caught:
        if "End of file reached" in str(warning.message):
            raise DicomError(f"{name}: truncated file: it ends inside the pixel data "
                             f"({len(data)} bytes)")
        logger.debug("%s: %s", name, warning.message)
    return ds


def _age(value: object) -> float:
    digits = "".join(ch for ch in str(value or "") if ch.isdigit())
    return float(digits) if digits else float("nan")


@contextmanager
def _damage_named(name: str) -> Iterator[None]:
    """Any failure inside pydicom or a decoder becomes a DicomError naming the file.

    pydicom converts values lazily, so a damaged element can raise nearly any exception type
    (ValueError, NotImplementedError, struct.error, ...) long after the file was parsed.
    """
    try:
        yield
    except DicomError:
        raise
    except Exception as exc:
        raise DicomError(f"{name}: damaged DICOM ({type(exc).__name__}: {exc})") from None


def read_header(data: bytes, name: str, patient_id: str | None = None) -> dict[str, object]:
    """The non-identifying header values of one DICOM file (no pixel decoding), a digest of
    its pixel data, and whether its PatientID is ``patient_id`` (the id itself is not kept)."""
    with _damage_named(name):
        return _read_header(data, name, patient_id)


def pixel_data_digest(data: bytes) -> str:
    """A digest of the bytes from the pixel data element on: equal for byte-identical images
    whatever their headers say (a copied file under another patientId)."""
    start = max(data.rfind(b"\xe0\x7f\x10\x00"), data.rfind(b"\x7f\xe0\x00\x10"), 0)
    return hashlib.blake2b(memoryview(data)[start:], digest_size=16).hexdigest()


def _read_header(data: bytes, name: str, patient_id: str | None) -> dict[str, object]:
    ds = _parse(data, name, stop_before_pixels=True)
    with lenient_values():
        header: dict[str, object] = {
            key: str(ds.get(tag, "") or "") for key, tag in HEADER_FIELDS.items()
        }
    header["patient_age"] = _age(ds.get("PatientAge"))
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    header["pixel_spacing"] = float(spacing[0]) if spacing else float("nan")
    header["rows"] = int(ds.get("Rows", 0) or 0)
    header["columns"] = int(ds.get("Columns", 0) or 0)
    header["pixel_hash"] = pixel_data_digest(data)
    header["patient_id_matches"] = None if patient_id is None else \
        str(ds.get("PatientID", "") or "") == patient_id
    return header


def _check_single_grayscale(ds: pydicom.Dataset, name: str) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError(f"{name}: no pixel data")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ColourImageError(
            f"{name}: colour or palette image ({photometric or 'no photometric interpretation'}, "
            f"{samples} samples per pixel); only grayscale X-rays are supported"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomError(f"{name}: multi-frame image ({frames} frames); one image per file needed")


# JPEG start-of-frame markers (every process, JPEG-LS's SOF55 included).
_SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                *range(0xCD, 0xD0), 0xF7}


def _jpeg_frame_size(frame: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG or JPEG-LS frame header; None without one."""
    if frame[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _SOF_MARKERS:
            if position + 9 > len(frame):
                return None
            height = int.from_bytes(frame[position + 5:position + 7], "big")
            width = int.from_bytes(frame[position + 7:position + 9], "big")
            return width, height
        if marker == 0xDA:  # scan data before any frame header
            return None
        position += 2 + int.from_bytes(frame[position + 2:position + 4], "big")
    return None


def _j2k_frame_size(frame: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG 2000 codestream's SIZ marker; None without one."""
    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0 or start + 24 > len(frame):
        return None
    x_size, y_size, x_offset, y_offset = (
        int.from_bytes(frame[start + 8 + 4 * i:start + 12 + 4 * i], "big") for i in range(4))
    return x_size - x_offset, y_size - y_offset


def _first_frame(ds: pydicom.Dataset, name: str) -> bytes:
    """The first frame of encapsulated (compressed) pixel data."""
    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError) as exc:
        raise DicomError(f"{name}: encapsulated pixel data is damaged ({exc})") from None


def _check_geometry(ds: pydicom.Dataset, name: str, frame: bytes | None) -> None:
    """Refuse sizes no X-ray has, and a compressed ``frame`` whose size differs from the
    header's."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or columns <= 0:
        raise DicomError(f"{name}: the header gives no image size ({columns}x{rows})")
    if rows * columns > MAX_IMAGE_PIXELS:
        raise DicomError(f"{name}: {columns}x{rows} pixels is larger than the "
                         f"{MAX_IMAGE_PIXELS // 2**20} megapixels this reader accepts")
    if frame is None:
        return
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        size, kind = _jpeg_frame_size(frame), "JPEG"
    elif syntax in JPEG2000TransferSyntaxes:
        size, kind = _j2k_frame_size(frame), "JPEG 2000"
    else:
        return  # RLE and others: decoders size their output from Rows and Columns
    if size is None:
        raise DicomError(f"{name}: {kind} pixel data has no frame header")
    if size != (columns, rows):
        raise DicomError(f"{name}: {kind} frame is {size[0]}x{size[1]} but the header says "
                         f"{columns}x{rows}")


def _is_competition_jpeg(ds: pydicom.Dataset) -> bool:
    return (
        ds.file_meta.get("TransferSyntaxUID") == JPEGBaseline8Bit
        and int(ds.get("BitsStored", 0)) == 8
        and str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME2"
        and "RescaleSlope" not in ds
        and "WindowCenter" not in ds
        and "VOILUTSequence" not in ds
        and "PixelPaddingValue" not in ds
    )


# libjpeg-turbo decodes at 1/2, 1/4 or 1/8 size in the DCT domain (block averages), which
# is both faster than a full decode and an area-averaging downscale.
_REDUCED_READS = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
                  4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _reduction(rows: int, columns: int, target_size: int | None) -> int:
    if not target_size:
        return 1
    longest = max(rows, columns)
    fitting = [r for r in (8, 4, 2) if rows % r == 0 and columns % r == 0
               and longest // r >= target_size]
    return fitting[0] if fitting else 1


def _decode_jpeg_frame(frame: bytes, ds: pydicom.Dataset, name: str, reduction: int
                       ) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(frame, dtype=np.uint8), _REDUCED_READS[reduction])
    if pixels is None:
        raise DicomError(f"{name}: corrupt JPEG pixel data")
    expected = (int(ds.Rows) // reduction, int(ds.Columns) // reduction)
    if pixels.shape != expected:
        raise DicomError(
            f"{name}: JPEG frame is {pixels.shape[1] * reduction}x{pixels.shape[0] * reduction}"
            f" but the header says {ds.Columns}x{ds.Rows}"
        )
    return pixels


def _pixel_array(ds: pydicom.Dataset, name: str) -> np.ndarray:
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        package = DECODER_PACKAGES.get(syntax)
        hint = f"; install {package} to decode it" if package else ""
        raise DicomError(
            f"{name}: cannot decode transfer syntax {syntax} "
            f"({getattr(ds.file_meta.TransferSyntaxUID, 'name', syntax)}): {exc}{hint}"
        ) from None
    except Exception as exc:
        raise DicomError(
            f"{name}: pixel data does not decode ({type(exc).__name__}: {exc})"
        ) from None


def decode(data: bytes, name: str, target_size: int | None = None) -> DicomImage:
    """Turn the bytes of one DICOM file into one uint8 grayscale image with air dark.

    With ``target_size``, competition JPEGs may be decoded reduced (by 2, 4 or 8) as long as
    the longer side stays at least ``target_size``: the caller resizes to that anyway.
    """
    with _damage_named(name):
        return _decode(data, name, target_size)


def _decode(data: bytes, name: str, target_size: int | None) -> DicomImage:
    ds = _parse(data, name)
    _check_single_grayscale(ds, name)
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    encapsulated = transfer_syntax is not None and transfer_syntax.is_encapsulated \
        and "PixelData" in ds
    frame = _first_frame(ds, name) if encapsulated else None
    _check_geometry(ds, name, frame)
    syntax = str(transfer_syntax or "")
    padding = None
    if _is_competition_jpeg(ds):  # JPEG Baseline: encapsulated, so ``frame`` is set
        reduction = _reduction(int(ds.Rows), int(ds.Columns), target_size)
        pixels = _decode_jpeg_frame(frame, ds, name, reduction)
    else:
        raw = _pixel_array(ds, name)
        if raw.ndim != 2:
            raise DicomError(f"{name}: pixel data has shape {raw.shape}, not one 2-D image")
        pixels, padding = to_display_uint8(raw, ds, name)
    with lenient_values():
        return DicomImage(
            pixels=np.ascontiguousarray(pixels),
            view_position=str(ds.get("ViewPosition", "") or ""),
            transfer_syntax=syntax,
            height=int(ds.Rows),
            width=int(ds.Columns),
            body_part=str(ds.get("BodyPartExamined", "") or ""),
            burned_in_annotation=str(ds.get("BurnedInAnnotation", "") or ""),
            padding=padding,
            modality=str(ds.get("Modality", "") or ""),
            sop_class=str(ds.get("SOPClassUID", "")
                          or ds.file_meta.get("MediaStorageSOPClassUID", "") or ""),
        )
