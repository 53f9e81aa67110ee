"""DICOM decoding: golden conversions of pydicom's bundled files, and clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from pneumonia_kedro.dicom import decode, read_header
from pneumonia_kedro.dicom.folder import folder_chunks
from pneumonia_kedro.errors import DicomError


def test_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


test_file.__test__ = False  # a helper, not a test


def reference_uint8(ds: pydicom.Dataset) -> np.ndarray:
    """Independent conversion: pydicom's modality LUT, then the DICOM window formula."""
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" in ds:
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        # PS3.3 C.11.2.1.2.1, linear function, scaled to 0..1
        scaled = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    else:
        scaled = (values - values.min()) / (values.max() - values.min())
    pixels = np.rint(scaled * 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",                   # 16-bit signed, window
        "MR_small_RLE.dcm",               # RLE Lossless
        "MR_small_bigendian.dcm",         # explicit VR big endian
        "MR_small_jp2klossless.dcm",      # JPEG 2000 lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "CT_small.dcm",                   # rescale slope/intercept (modality LUT), no window
        "693_J2KI.dcm",                   # JPEG 2000, 14-bit, rescale and window
        "JPGExtended.dcm",                # JPEG Extended 12-bit, non-square 1024x256
        "JPEG2000.dcm",                   # JPEG 2000 lossy
        "image_dfl.dcm",                  # deflated explicit VR little endian
    ],
)
def test_golden_conversion_matches_independent_reference(name):
    data = test_file(name)
    image = decode(data, name)
    ds = pydicom.dcmread(io.BytesIO(data))
    expected = reference_uint8(ds)
    assert image.pixels.dtype == np.uint8
    assert image.pixels.shape == (ds.Rows, ds.Columns)
    # One grey level of rounding between float paths is allowed.
    assert np.abs(image.pixels.astype(int) - expected.astype(int)).max() <= 1
    assert image.pixels.max() > image.pixels.min()


def test_monochrome1_is_inverted_so_air_is_dark():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    plain = decode(test_file("MR_small.dcm"), "mono2").pixels
    ds.PhotometricInterpretation = "MONOCHROME1"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    inverted = decode(buffer.getvalue(), "mono1").pixels
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_header_has_no_identifying_values():
    header = read_header(test_file("CT_small.dcm"), "CT_small.dcm")
    assert set(header) == {"view_position", "patient_sex", "patient_age", "modality",
                           "body_part", "burned_in_annotation", "pixel_spacing", "rows",
                           "columns", "pixel_hash", "patient_id_matches"}
    assert header["patient_id_matches"] is None  # no patientId to compare with was given
    assert header["rows"] == 128 and header["modality"] == "CT"


def without_pixel_data() -> bytes:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def wrong_rows() -> bytes:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = 128
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.dcm", lambda: b"", "empty file"),
        ("random.dcm", lambda: np.random.default_rng(0).bytes(5000), "not a DICOM file"),
        ("palette.dcm", lambda: test_file("examples_palette.dcm"), "colour or palette image"),
        ("rgb.dcm", lambda: test_file("ExplVR_BigEnd.dcm"), "colour or palette image"),
        ("rgb_jpeg.dcm", lambda: test_file("SC_rgb_jpeg.dcm"), "colour or palette image"),
        ("multi.dcm", lambda: test_file("rtdose.dcm"), "multi-frame image"),
        ("truncated.dcm", lambda: test_file("MR_truncated.dcm"), "pixel data does not decode"),
        ("half.dcm", lambda: test_file("MR_small.dcm")[:3000], "pixel data does not decode"),
        ("nopixels.dcm", without_pixel_data, "no pixel data"),
        ("rows.dcm", wrong_rows, "pixel data does not decode"),
    ],
)
def test_bad_files_get_a_clear_error_naming_the_file(name, data, reason):
    with pytest.raises(DicomError, match=reason) as info:
        decode(data(), f"/data/{name}")
    assert str(info.value).startswith(f"/data/{name}: ")


def test_missing_decoder_names_the_package_to_install():
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    removed = {label: plugin for label, plugin in JPEGLSLosslessDecoder._available.items()}
    for label in removed:
        JPEGLSLosslessDecoder.remove_plugin(label)
    try:
        with pytest.raises(DicomError, match="install pylibjpeg-libjpeg") as info:
            decode(test_file("MR_small_jpeg_ls_lossless.dcm"), "ls.dcm")
        assert "1.2.840.10008.1.2.4.80" in str(info.value)
    finally:
        JPEGLSLosslessDecoder._available.update(removed)


@pytest.fixture(scope="module")
def competition_file() -> bytes:
    from tests.demo_folder import one_demo_file

    return one_demo_file(seed=2)


def test_competition_files_decode_with_libjpeg_turbo_and_agree_with_pydicom(competition_file):
    image = decode(competition_file, "c.dcm")
    reference = pydicom.dcmread(io.BytesIO(competition_file))
    assert image.transfer_syntax == "1.2.840.10008.1.2.4.50"  # JPEG Baseline: the fast path
    assert (image.height, image.width) == image.pixels.shape == (1024, 1024)
    assert image.view_position == reference.ViewPosition and image.padding is None
    assert np.abs(image.pixels.astype(int) - reference.pixel_array.astype(int)).max() <= 1
    # Decoded reduced in the DCT domain for a 512 px cache: the same field of view, halved.
    halved = decode(competition_file, "c.dcm", target_size=512)
    assert (halved.height, halved.width) == (1024, 1024) and halved.pixels.shape == (512, 512)
    block_means = image.pixels.reshape(512, 2, 512, 2).mean(axis=(1, 3))
    assert np.abs(halved.pixels - block_means).mean() < 2


@pytest.mark.parametrize("cut", [200, 1000, 50_000])
def test_truncated_competition_file_gets_a_clear_error(competition_file, cut):
    with pytest.raises(DicomError) as info:
        decode(competition_file[:cut], "/data/cut.dcm")
    assert str(info.value).startswith("/data/cut.dcm: ")


def test_a_window_sends_a_competition_file_through_pydicom(competition_file):
    ds = pydicom.dcmread(io.BytesIO(competition_file))
    ds.WindowCenter, ds.WindowWidth = 100, 50
    buffer = io.BytesIO()
    ds.save_as(buffer)
    windowed = decode(buffer.getvalue(), "w.dcm").pixels
    assert windowed.min() == 0 and windowed.max() == 255  # the window stretches mid-greys
    np.testing.assert_array_equal(windowed, reference_uint8(ds))


def test_folder_scan_keeps_links_inside_and_rejects_what_could_leave_it(tmp_path):
    from pneumonia_kedro.dicom import DicomFolder

    folder, outside = tmp_path / "images", tmp_path / "outside"
    (folder / "shared").mkdir(parents=True)
    outside.mkdir()
    (folder / "p1.dcm").write_bytes(b"1")
    (folder / "shared" / "p2-real.dcm").write_bytes(b"2")
    (folder / "p2.dcm").symlink_to(folder / "shared" / "p2-real.dcm")  # stays inside
    (outside / "secret.dcm").write_bytes(b"3")
    (folder / "p3.dcm").symlink_to(outside / "secret.dcm")
    (folder / "p4.dcm").symlink_to("../outside/secret.dcm")  # relative, still outside
    (folder / "p5.dcm").symlink_to(folder / "missing.dcm")
    (folder / "p6.dcm").mkdir()
    (folder / "..hidden.dcm").write_bytes(b"7")
    (folder / "-rf.dcm").write_bytes(b"8")
    (folder / "notes.txt").write_bytes(b"9")
    (folder / "p7.DCM").write_bytes(b"10")
    (folder / "p8").mkdir()
    scanned = DicomFolder.scan(str(folder))
    assert scanned.patient_ids == ["p1", "p2"]
    assert scanned.read_bytes("p2") == b"2"
    assert scanned.rejected == {
        "p7.DCM": "file name ends in '.DCM', not '.dcm' (names are case-sensitive)",
        "p8": "a subfolder: images must lie directly in the folder",
        "shared": "a subfolder: images must lie directly in the folder",
        "-rf.dcm": "file name is not a safe patientId",
        "..hidden.dcm": "file name is not a safe patientId",
        "p3.dcm": "symlink pointing outside the data folder",
        "p4.dcm": "symlink pointing outside the data folder",
        "p5.dcm": "not a regular file (broken symlink)",
        "p6.dcm": "not a regular file (directory)",
    }
    with pytest.raises(DicomError, match="no file for patientId '../outside/secret'"):
        scanned.read_bytes("../outside/secret")
    assert scanned.absence_reason("p3").endswith("p3.dcm: symlink pointing outside the data "
                                                 "folder")
    assert scanned.absence_reason("p7").endswith("p7.DCM: file name ends in '.DCM', not "
                                                 "'.dcm' (names are case-sensitive)")
    assert scanned.absence_reason("p8").endswith("/p8: a subfolder: images must lie directly "
                                                 "in the folder")
    assert scanned.absence_reason("p9") == f"no file {folder}/p9.dcm"


def test_a_jpeg_frame_that_disagrees_with_the_header_is_refused_before_decoding():
    # A frame height of 0 made a JPEG decoder allocate ~24 GB (found by the fuzz run).
    data = bytearray(test_file("JPGExtended.dcm"))
    sof = data.index(b"\xff\xc1", data.index(b"\xe0\x7f\x10\x00"))
    data[sof + 5:sof + 7] = b"\x00\x00"
    with pytest.raises(DicomError, match=r"^sof0\.dcm: JPEG frame is \d+x0 but the header says"):
        decode(bytes(data), "sof0.dcm")


def test_an_image_size_no_x_ray_has_is_refused():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 60000
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(DicomError, match="60000x60000 pixels is larger than the 64 megapixels"):
        decode(buffer.getvalue(), "huge.dcm")


def test_deflated_data_is_refused_when_it_inflates_past_the_bound(monkeypatch):
    from pneumonia_kedro.dicom import reader

    data = test_file("image_dfl.dcm")
    assert decode(data, "dfl.dcm").pixels.size > 0
    monkeypatch.setattr(reader, "MAX_INFLATED_BYTES", 4096)
    with pytest.raises(DicomError, match="dfl.dcm: deflated data inflates to more than"):
        decode(data, "dfl.dcm")
    with pytest.raises(DicomError, match="dfl.dcm: deflated data inflates"):
        read_header(data, "dfl.dcm")


@pytest.mark.parametrize(("patients", "sizes"), [(0, [0]), (2, [2]), (3, [2, 0]), (4, [2, 1])])
def test_folder_chunks_are_saved_as_made_and_the_last_is_marked(patients, sizes):
    """Chunks of 2 patients, p2 skipped (``None``); each chunk comes before the next file is
    made, and an exact multiple ends with its own marked chunk, no empty one after."""
    made = []

    def make(patient_id: str) -> bytes | None:
        made.append(patient_id)
        return None if patient_id == "p2" else patient_id.encode()

    ids = [f"p{i}" for i in range(patients)]
    chunks = folder_chunks(ids, make, 2)
    seen = []
    for chunk in chunks:
        assert made == ids[:len(made)] and len(made) == min(len(ids), 2 * (len(seen) + 1))
        seen.append(chunk)
    assert [len(chunk) for chunk in seen] == sizes
    assert [chunk.last for chunk in seen] == [False] * (len(sizes) - 1) + [True]
    assert [k for chunk in seen for k in chunk] == [i for i in ids if i != "p2"]
