"""The input quality gate: each check, its policies, and its place in the cache build."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.dicom import DicomFolder, DicomImage, decode
from pneumonia_kedro.dicom.quality import (
    InputQualityError,
    QualityConfig,
    check,
    header_flags,
    inversion_contrast,
    pixel_flags,
)
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, plan
from tests.dicom_files import native_dicom


@pytest.fixture(scope="module")
def chest() -> DicomImage:
    from tests.demo_folder import one_demo_file

    return decode(one_demo_file(seed=3), "chest.dcm")


def image(**changes) -> DicomImage:
    base = DicomImage(pixels=np.zeros((4, 4), np.uint8), view_position="PA",
                      transfer_syntax="", height=1024, width=1024, body_part="CHEST")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(("changes", "checks"), [
    ({}, []),
    ({"body_part": "KNEE"}, ["not_chest"]),
    ({"body_part": ""}, []),  # absent: nothing to say
    ({"view_position": "LL"}, ["lateral_view"]),
    ({"view_position": ""}, ["unknown_view"]),
    ({"view_position": "OBL"}, ["unknown_view"]),
    ({"burned_in_annotation": "YES"}, ["burned_in_annotation"]),
    ({"height": 200, "width": 240}, ["tiny_image"]),
    ({"height": 1024, "width": 256}, ["aspect_ratio"]),
    ({"height": 1841, "width": 1955}, []),  # a real CR size
])
def test_header_checks(changes, checks):
    assert [f.check for f in header_flags(image(**changes), QualityConfig())] == checks


def test_competition_like_chest_passes_and_its_inversion_is_flagged(chest):
    assert check(chest, QualityConfig(), "chest.dcm").flags == ()
    assert inversion_contrast(chest.pixels) > 10
    inverted = dataclasses.replace(chest, pixels=255 - chest.pixels)
    (flag,) = pixel_flags(inverted, QualityConfig())
    assert flag.check == "looks_inverted" and "brighter than the mediastinum" in flag.reason


def test_a_wrong_photometric_interpretation_is_caught_after_decoding(chest):
    wrong = decode(native_dicom(chest.pixels, photometric="MONOCHROME1"), "m1.dcm")
    assert [f.check for f in pixel_flags(wrong, QualityConfig())] == ["looks_inverted"]


@pytest.mark.parametrize(("levels", "flagged"), [(0, True), (5, True), (40, False)])
def test_near_constant_images(levels, flagged):
    rng = np.random.default_rng(0)
    pixels = (100 + rng.integers(0, levels + 1, size=(64, 64))).astype(np.uint8)
    flags = pixel_flags(image(pixels=pixels), QualityConfig())
    assert [f.check for f in flags] == (["near_constant"] if flagged else [])


def test_padding_is_left_out_of_the_near_constant_check():
    pixels = np.zeros((64, 64), np.uint8)
    pixels[8:56, 8:56] = 120  # a flat image inside a padded (now black) border
    padding = pixels == 0
    assert pixel_flags(image(pixels=pixels), QualityConfig()) == []  # border gives a span
    assert [f.check for f in pixel_flags(image(pixels=pixels, padding=padding),
                                         QualityConfig())] == ["near_constant"]


def test_policies_warn_skip_and_error():
    lateral = image(view_position="LL")
    assert check(lateral, QualityConfig(), "x.dcm").skip_reason == ""
    skipped = check(lateral, QualityConfig(lateral_view="skip"), "x.dcm")
    assert skipped.skip_reason == "x.dcm: quality gate lateral_view: ViewPosition LL: the " \
                                  "model knows AP and PA"
    with pytest.raises(InputQualityError, match=r"^/in/x\.dcm: quality gate lateral_view"):
        check(lateral, QualityConfig(lateral_view="error"), "/in/x.dcm")


@pytest.mark.parametrize(("params", "message"), [
    ({"lateral_view": "ignore"}, r"params:ingest.quality.lateral_view = 'ignore'"),
    ({"colour": "warn"}, r"params:ingest.quality.colour = 'warn'"),
    ({"min_side": 0}, "params:ingest.quality.min_side = 0 is out of range: it must be >= 1"),
    ({"max_aspect_ratio": 0.5}, "quality.max_aspect_ratio = 0.5 is out of range: it must be "
                                ">= 1"),
    ({"near_constant_levels": 300}, "quality.near_constant_levels = 300 is out of range: it "
                                    "must be >= 0 and <= 255"),
])
def test_bad_gate_settings_name_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        from_params(QualityConfig, params, "ingest.quality")


def write_folder(tmp_path, files: dict[str, bytes]) -> DicomFolder:
    (tmp_path / "in").mkdir()
    for name, data in files.items():
        (tmp_path / "in" / f"{name}.dcm").write_bytes(data)
    return DicomFolder.scan(str(tmp_path / "in"))


def test_cache_build_applies_the_gate(tmp_path, chest):
    rgb = Path(get_testdata_file("SC_rgb_jpeg.dcm")).read_bytes()
    folder = write_folder(tmp_path, {
        "good": native_dicom(chest.pixels),
        "flat": native_dicom(np.full((300, 300), 9, np.uint16), bits_stored=12),
        "lateral": native_dicom(chest.pixels, ViewPosition="LL"),
        "rgb": rgb,
    })
    quality = QualityConfig(near_constant="skip", colour="skip")
    config = CacheConfig(image_size=64, workers=0, progress=False, quality=quality)
    build(plan(folder, folder.patient_ids, config), tmp_path / "cache")
    index = ImageCache(tmp_path / "cache").index.set_index("patientId")
    assert index.loc["good", "status"] == "ok" and index.loc["good", "flags"] == ""
    assert index.loc["lateral", "status"] == "ok"
    assert index.loc["lateral", "flags"].startswith("lateral_view: ViewPosition LL")
    assert index.loc["flat", "status"] == "skipped"
    assert index.loc["flat", "reason"].startswith(f"{folder.display_name('flat')}: quality "
                                                  "gate near_constant")
    assert index.loc["rgb", "status"] == "skipped"
    assert "quality gate colour: colour or palette image" in index.loc["rgb", "reason"]

    # A gate policy 'error' stops the build even where undecodable files are only skipped.
    strict = CacheConfig(image_size=64, workers=0, progress=False, on_error="skip",
                         quality=QualityConfig(lateral_view="error"))
    with pytest.raises(InputQualityError, match=r"lateral\.dcm: quality gate lateral_view"):
        build(plan(folder, folder.patient_ids, strict), tmp_path / "strict")


def test_gate_settings_are_part_of_the_cache_fingerprint(tmp_path, chest):
    folder = write_folder(tmp_path, {"a": native_dicom(chest.pixels)})
    base = CacheConfig(image_size=64, workers=0, progress=False)
    warn = plan(folder, ["a"], base).fingerprint()
    assert warn != plan(folder, ["a"], dataclasses.replace(
        base, quality=QualityConfig(near_constant="skip"))).fingerprint()
    assert warn != plan(folder, ["a"], dataclasses.replace(base, on_error="skip")).fingerprint()
