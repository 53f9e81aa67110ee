"""Hospital DICOMs: VOI LUTs, windows, modality LUTs, signed pixels, padding and unused bits,
each against values computed here from the standard's formulas (PS3.3 C.11), one pixel at a
time, independently of the project's vectorised code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pneumonia_kedro.dicom import decode
from pneumonia_kedro.errors import DicomError
from tests.dicom_files import native_dicom

RNG = np.random.default_rng(5)
IMAGE_8 = RNG.integers(0, 256, size=(16, 20)).astype(np.uint8)
IMAGE_12 = RNG.integers(0, 4096, size=(16, 20)).astype(np.uint16)


def to_uint8(unit: list[list[float]]) -> np.ndarray:
    return np.array([[int(math.floor(v * 255 + 0.5)) for v in row] for row in unit],
                    dtype=np.uint8)


def lut_reference(image: np.ndarray, table: list[int], first_mapped: int) -> np.ndarray:
    """PS3.3 C.11.2.1.1: below the first mapped value the first entry, above the last the
    last; the LUT's own range (its smallest..largest entry) becomes 0..255."""
    low, high = min(table), max(table)
    unit = []
    for row in image.tolist():
        out = []
        for value in row:
            index = min(max(value - first_mapped, 0), len(table) - 1)
            out.append((table[index] - low) / (high - low))
        unit.append(out)
    return to_uint8(unit)


def window_reference(image: np.ndarray, center: float, width: float, function: str
                     ) -> np.ndarray:
    unit = []
    for row in image.tolist():
        out = []
        for x in row:
            if function == "SIGMOID":
                out.append(1 / (1 + math.exp(-4 * (x - center) / width)))
            elif function == "LINEAR":  # C.11.2.1.2.1
                if x <= center - 0.5 - (width - 1) / 2:
                    out.append(0.0)
                elif x > center - 0.5 + (width - 1) / 2:
                    out.append(1.0)
                else:
                    out.append((x - (center - 0.5)) / (width - 1) + 0.5)
            elif x <= center - width / 2:  # LINEAR_EXACT, C.11.2.1.3.2
                out.append(0.0)
            elif x > center + width / 2:
                out.append(1.0)
            else:
                out.append((x - center) / width + 0.5)
        unit.append(out)
    return to_uint8(unit)


def min_max_reference(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return to_uint8([[(v - low) / (high - low) for v in row] for row in values.tolist()])


def converted(data: bytes) -> np.ndarray:
    return decode(data, "t.dcm").pixels


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_voi_lut_sequence_uses_the_luts_own_output_range(bits):
    # A gamma-like curve onto the LUT's bit depth; 16 bits made the image all black before.
    table = [round((2**bits - 1) * (i / 255) ** 0.6) for i in range(256)]
    data = native_dicom(IMAGE_8, VOILUTSequence=[
        {"LUTDescriptor": [256, 0, bits], "LUTData": table}])
    pixels = converted(data)
    assert pixels.max() == 255 and pixels.min() < 20
    np.testing.assert_array_equal(pixels, lut_reference(IMAGE_8, table, 0))


def test_voi_lut_data_stored_as_ow_words():
    table = [round(65535 * (i / 255) ** 1.5) for i in range(256)]
    words = np.array(table, dtype="<u2").tobytes()
    data = native_dicom(IMAGE_8, VOILUTSequence=[
        {"LUTDescriptor": [256, 0, 16], "LUTData": words}])
    np.testing.assert_array_equal(converted(data), lut_reference(IMAGE_8, table, 0))


def test_voi_lut_whose_first_mapped_value_is_not_zero():
    table = [100 + 3 * i for i in range(1024)]  # maps 1500..2523; nothing maps to 0
    data = native_dicom(IMAGE_12, bits_stored=12, VOILUTSequence=[
        {"LUTDescriptor": [1024, 1500, 12], "LUTData": table}])
    pixels = converted(data)
    np.testing.assert_array_equal(pixels, lut_reference(IMAGE_12.astype(int), table, 1500))
    assert (pixels[IMAGE_12 < 1500] == 0).all() and (pixels[IMAGE_12 > 2523] == 255).all()


@pytest.mark.parametrize(("function", "center", "width"),
                         [("LINEAR", 2000, 1500), ("LINEAR_EXACT", 2000, 1500),
                          ("SIGMOID", 1800, 1200)])
def test_window_functions(function, center, width):
    data = native_dicom(IMAGE_12, bits_stored=12, WindowCenter=center, WindowWidth=width,
                        VOILUTFunction=function)
    np.testing.assert_array_equal(converted(data),
                                  window_reference(IMAGE_12.astype(int), center, width,
                                                   function))


def test_of_several_windows_the_first_is_used():
    data = native_dicom(IMAGE_12, bits_stored=12, WindowCenter=[1000, 3000],
                        WindowWidth=[800, 400])
    np.testing.assert_array_equal(converted(data),
                                  window_reference(IMAGE_12.astype(int), 1000, 800, "LINEAR"))


def test_monochrome1_with_a_voi_lut_is_inverted_after_the_lut():
    table = [round(4095 * (i / 255) ** 2) for i in range(256)]
    lut = [{"LUTDescriptor": [256, 0, 12], "LUTData": table}]
    plain = converted(native_dicom(IMAGE_8, VOILUTSequence=lut))
    inverted = converted(native_dicom(IMAGE_8, photometric="MONOCHROME1", VOILUTSequence=lut))
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_modality_lut_sequence_then_min_max():
    table = [(i * 7) % 3000 for i in range(4096)]  # not monotone: a real lookup is needed
    data = native_dicom(IMAGE_12, bits_stored=12, ModalityLUTSequence=[
        {"LUTDescriptor": [4096, 0, 16], "LUTData": table, "ModalityLUTType": "US"}])
    modality = np.array([[table[v] for v in row] for row in IMAGE_12.tolist()])
    np.testing.assert_array_equal(converted(data), min_max_reference(modality))


def test_signed_pixels_with_rescale_and_window():
    stored = RNG.integers(-1024, 3072, size=(16, 20)).astype(np.int16)
    data = native_dicom(stored, bits_stored=12 + 4, RescaleSlope=1, RescaleIntercept=-1024,
                        WindowCenter=-600, WindowWidth=1500)
    hounsfield = stored.astype(int) - 1024
    np.testing.assert_array_equal(converted(data),
                                  window_reference(hounsfield, -600, 1500, "LINEAR"))


def test_unused_high_bits_are_ignored():
    garbage = IMAGE_12 | (RNG.integers(0, 16, size=IMAGE_12.shape).astype(np.uint16) << 12)
    assert (garbage != IMAGE_12).any()
    clean = converted(native_dicom(IMAGE_12, bits_stored=12))
    dirty = converted(native_dicom(IMAGE_12, bits_stored=12, raw_words=garbage))
    np.testing.assert_array_equal(dirty, clean)
    np.testing.assert_array_equal(clean, min_max_reference(IMAGE_12.astype(int)))


def padded(content: np.ndarray, value: int, border: int = 6) -> np.ndarray:
    image = np.full((content.shape[0] + 2 * border, content.shape[1] + 2 * border), value,
                    dtype=content.dtype)
    image[border:-border, border:-border] = content
    return image


@pytest.mark.parametrize(("photometric", "padding_value", "range_limit"),
                         [("MONOCHROME2", 0, None), ("MONOCHROME1", 4095, None),
                          ("MONOCHROME2", 4095, 4000)])
def test_padding_is_air_and_leaves_the_lung_contrast_alone(photometric, padding_value,
                                                           range_limit):
    lung = RNG.integers(1200, 2600, size=(20, 24)).astype(np.uint16)  # no value near padding
    extra = {} if range_limit is None else {"PixelPaddingRangeLimit": range_limit}
    image = padded(lung, padding_value)
    if range_limit is not None:  # a range: border values anywhere in 4000..4095
        border = image == padding_value
        image[border] = RNG.integers(4000, 4096, size=int(border.sum()))
    unpadded = converted(native_dicom(lung, bits_stored=12, photometric=photometric))
    result = decode(native_dicom(image, bits_stored=12, photometric=photometric,
                                 PixelPaddingValue=padding_value, **extra), "p.dcm")
    np.testing.assert_array_equal(result.pixels[6:-6, 6:-6], unpadded)
    assert (result.pixels[:6] == 0).all() and (result.pixels[:, -6:] == 0).all()
    assert result.padding is not None and int(result.padding.sum()) == image.size - lung.size
    assert unpadded.min() == 0 and unpadded.max() == 255  # full contrast inside


def test_without_the_padding_tag_a_border_compresses_the_contrast():
    # What the padding tag fixes: the same border, undeclared, takes part in min..max.
    lung = RNG.integers(1200, 2600, size=(20, 24)).astype(np.uint16)
    pixels = converted(native_dicom(padded(lung, 0), bits_stored=12))
    assert pixels[6:-6, 6:-6].min() > 100


def test_a_constant_image_converts_to_zeros_without_failing():
    flat = np.full((16, 20), 700, dtype=np.uint16)
    assert (converted(native_dicom(flat, bits_stored=12)) == 0).all()


@pytest.mark.parametrize(("extra", "message"), [
    ({"WindowCenter": 100, "WindowWidth": 0.5}, "LINEAR window width 0.5 is below 1"),
    ({"WindowCenter": 100, "WindowWidth": 0, "VOILUTFunction": "SIGMOID"},
     "SIGMOID window width 0.0 is not positive"),
    ({"WindowCenter": 100, "WindowWidth": 10, "VOILUTFunction": "GAMMA"},
     "unknown VOILUTFunction 'GAMMA'"),
    ({"VOILUTSequence": [{"LUTDescriptor": [256, 0, 16], "LUTData": [1, 2, 3]}]},
     "VOI LUT has 3 entries, its descriptor says 256"),
])
def test_invalid_voi_settings_name_the_file(extra, message):
    with pytest.raises(DicomError, match=f"^bad.dcm: {message}"):
        decode(native_dicom(IMAGE_8, **extra), "bad.dcm")
