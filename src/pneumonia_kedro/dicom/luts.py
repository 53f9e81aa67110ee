"""Stored pixel values to display grey levels: padding, modality LUT, VOI LUT or window.

The order follows DICOM's grayscale pipeline (PS3.3 C.11, C.7.5.1.1.2): pixel padding is found
on the stored values, the modality LUT (rescale or Modality LUT Sequence) gives modality units,
the VOI transform (a VOI LUT Sequence, else the first window, else the image's own min..max)
gives 0..1, MONOCHROME1 is inverted so that air is dark as in the training data, and padding
pixels become air (0). Padding never takes part in the min..max scaling, so a detector border
does not compress the contrast of the lung.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from pneumonia_kedro.errors import DicomError


def padding_mask(raw: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Stored values marked as padding (PixelPaddingValue, up to PixelPaddingRangeLimit)."""
    if ds.get("PixelPaddingValue") is None:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    values = [_stored_value(ds.PixelPaddingValue, signed)]
    if ds.get("PixelPaddingRangeLimit") is not None:
        values.append(_stored_value(ds.PixelPaddingRangeLimit, signed))
    low, high = min(values), max(values)
    mask = (raw >= low) & (raw <= high)
    return mask if mask.any() else None


def _stored_value(value: object, signed: bool) -> int:
    # The tag's VR is US or SS by PixelRepresentation; some writers store -1 as 65535.
    number = int(np.atleast_1d(value)[0])
    return number - 65536 if signed and number > 32767 else number


def _lut_table(item: pydicom.Dataset, ds: pydicom.Dataset, name: str
               ) -> tuple[np.ndarray, int]:
    """One VOI LUT item's entries and the first stored value it maps."""
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    if bits not in (8, *range(10, 17)):
        raise DicomError(f"{name}: VOI LUT with {bits} bits per entry (8 or 10-16 allowed)")
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        order = ">" if ds.original_encoding[1] is False else "<"
        table = np.frombuffer(data, dtype=f"{order}u2")
    else:
        table = np.asarray(np.atleast_1d(data), dtype=np.int64)
    if len(table) < entries:
        raise DicomError(f"{name}: VOI LUT has {len(table)} entries, its descriptor says "
                         f"{entries}")
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first_mapped > 32767:
        first_mapped -= 65536
    return table[:entries].astype(np.float64), first_mapped


def _voi_lut(values: np.ndarray, ds: pydicom.Dataset, name: str) -> np.ndarray:
    """The first VOI LUT, scaled by its own output range (min..max of its entries)."""
    table, first_mapped = _lut_table(ds.VOILUTSequence[0], ds, name)
    # Own lookup: pydicom's casts the index to the LUT's output type, wrapping large values.
    index = np.clip(np.rint(values) - first_mapped, 0, len(table) - 1).astype(np.intp)
    low, high = float(table.min()), float(table.max())
    if high <= low:
        return np.zeros(values.shape)
    return (table[index] - low) / (high - low)


def _first(value: object) -> float:
    return float(np.atleast_1d(value)[0])


def _window(values: np.ndarray, ds: pydicom.Dataset, name: str) -> np.ndarray:
    """The first window (PS3.3 C.11.2.1.2 and C.11.2.1.3) mapped onto 0..1."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise DicomError(f"{name}: SIGMOID window width {width} is not positive")
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR":
        if width < 1:
            raise DicomError(f"{name}: LINEAR window width {width} is below 1")
        center, width = center - 0.5, width - 1
        if width == 0:  # a width of 1 is a threshold at the centre
            return (values > center).astype(np.float64)
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise DicomError(f"{name}: LINEAR_EXACT window width {width} is not positive")
    else:
        raise DicomError(f"{name}: unknown VOILUTFunction {function!r}")
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)


def _min_max(values: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    content = values if padding is None else values[~padding]
    if content.size == 0:
        return np.zeros(values.shape)
    low, high = float(content.min()), float(content.max())
    if high <= low:
        return np.zeros(values.shape)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def to_display_uint8(raw: np.ndarray, ds: pydicom.Dataset, name: str = "DICOM"
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored values to uint8 grey levels with air dark, and the padding mask (or None)."""
    padding = padding_mask(raw, ds)
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    if ds.get("VOILUTSequence"):
        unit = _voi_lut(values, ds, name)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        unit = _window(values, ds, name)
    else:
        unit = _min_max(values, padding)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    pixels = np.rint(unit * 255.0).astype(np.uint8)
    if padding is not None:
        pixels[padding] = 0
    return pixels, padding
