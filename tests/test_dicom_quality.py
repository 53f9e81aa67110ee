"""The input quality gate: each check, its policies, its one parameter group
(conf/base/parameters_quality.yml) and its place in the cache build."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

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
from pneumonia_kedro.dicom.quality_settings import quality_settings
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, decode_checked, plan
from tests.conftest import PROJECT_ROOT
from tests.dicom_files import native_dicom

PARAMS = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_quality.yml").read_text())[
    "quality"]
TRAINING = quality_settings(PARAMS).gate("training")
INFERENCE = quality_settings(PARAMS).gate("inference")


def gate(use: str = "training", **policies: str) -> QualityConfig:
    """The conf/base gate of ``use`` with some policies changed."""
    return dataclasses.replace(TRAINING if use == "training" else INFERENCE, **policies)


@pytest.fixture(scope="module")
def chest() -> DicomImage:
    from tests.demo_folder import one_demo_file

    return decode(one_demo_file(seed=3), "chest.dcm")


def image(**changes) -> DicomImage:
    base = DicomImage(pixels=np.zeros((4, 4), np.uint8), view_position="PA",
                      transfer_syntax="", height=1024, width=1024, body_part="CHEST",
                      modality="CR", sop_class=SecondaryCaptureImageStorage)
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
    ({"modality": "DX", "sop_class": DigitalXRayImageStorageForPresentation}, []),
    ({"modality": "dx", "sop_class": DigitalXRayImageStorageForProcessing}, []),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.1"}, []),  # CR Image Storage
    ({"modality": "MR", "sop_class": MRImageStorage}, ["modality", "sop_class"]),
    # A CT slice without BodyPartExamined: not_chest cannot see it, Modality can.
    ({"modality": "CT", "sop_class": CTImageStorage, "body_part": ""},
     ["modality", "sop_class"]),
    ({"modality": "", "sop_class": ""}, ["modality", "sop_class"]),
    ({"modality": "OT"}, ["modality"]),
])
def test_header_checks(changes, checks):
    assert [f.check for f in header_flags(image(**changes), TRAINING)] == checks


@pytest.mark.parametrize(("name", "modality"), [
    ("693_J2KI.dcm", "CT"),  # 512 x 512 CT slice, no BodyPartExamined
    ("MR_small.dcm", "MR"),
    ("examples_overlay.dcm", "MR"),
])
def test_real_non_radiographs_are_not_predicted(name, modality):
    """Before Modality and SOP Class were checked, the CT slice passed the inference gate
    with an unknown_view warning and was predicted."""
    data = Path(get_testdata_file(name)).read_bytes()
    result, reason, flags = decode_checked(data, name, 512, INFERENCE)
    assert result is None
    assert f"quality gate modality: Modality {modality}: the model knows chest radiographs" \
        in reason
    assert "sop_class: SOP Class 1.2.840.10008.5.1.4.1.1." in flags
    # Training only warns: the image is cached, with the flags.
    trained, reason, flags = decode_checked(data, name, 512, TRAINING)
    assert trained is not None and reason == "" and "modality: Modality" in flags


def test_competition_like_chest_passes_and_its_inversion_is_flagged(chest):
    assert chest.modality == "CR" and chest.sop_class == SecondaryCaptureImageStorage
    assert check(chest, INFERENCE, "chest.dcm").flags == ()
    assert inversion_contrast(chest.pixels) > 10
    inverted = dataclasses.replace(chest, pixels=255 - chest.pixels)
    (flag,) = pixel_flags(inverted, TRAINING)
    assert flag.check == "looks_inverted" and "brighter than the mediastinum" in flag.reason


def test_a_wrong_photometric_interpretation_is_caught_after_decoding(chest):
    wrong = decode(native_dicom(chest.pixels, photometric="MONOCHROME1"), "m1.dcm")
    assert [f.check for f in pixel_flags(wrong, TRAINING)] == ["looks_inverted"]


@pytest.mark.parametrize(("levels", "flagged"), [(0, True), (5, True), (40, False)])
def test_near_constant_images(levels, flagged):
    rng = np.random.default_rng(0)
    pixels = (100 + rng.integers(0, levels + 1, size=(64, 64))).astype(np.uint8)
    flags = pixel_flags(image(pixels=pixels), TRAINING)
    assert [f.check for f in flags] == (["near_constant"] if flagged else [])


def test_padding_is_left_out_of_the_near_constant_check():
    pixels = np.zeros((64, 64), np.uint8)
    pixels[8:56, 8:56] = 120  # a flat image inside a padded (now black) border
    padding = pixels == 0
    assert pixel_flags(image(pixels=pixels), TRAINING) == []  # border gives a span
    assert [f.check for f in pixel_flags(image(pixels=pixels, padding=padding),
                                         TRAINING)] == ["near_constant"]


def test_policies_warn_skip_and_error():
    lateral = image(view_position="LL")
    assert check(lateral, gate(lateral_view="warn"), "x.dcm").skip_reason == ""
    skipped = check(lateral, gate(lateral_view="skip"), "x.dcm")
    assert skipped.skip_reason == "x.dcm: quality gate lateral_view: ViewPosition LL: the " \
                                  "model knows AP and PA"
    with pytest.raises(InputQualityError, match=r"^/in/x\.dcm: quality gate lateral_view"):
        check(lateral, gate(lateral_view="error"), "/in/x.dcm")
    with pytest.raises(InputQualityError, match=r"quality gate modality: Modality US"):
        check(image(modality="US"), gate(modality="error"), "us.dcm")


def test_one_source_for_every_gate_setting():
    """Every policy and threshold is in parameters_quality.yml and nowhere else: the gate's
    dataclass has no defaults, and no other parameter group configures a gate."""
    with pytest.raises(TypeError, match="missing"):
        QualityConfig()  # type: ignore[call-arg]
    for name in ("ingest", "inference", "evaluate"):
        text = (PROJECT_ROOT / f"conf/base/parameters_{name}.yml").read_text()
        assert not any(line.strip().startswith(("quality:", "not_chest:", "min_side:"))
                       for line in text.splitlines()), name
    from pneumonia_kedro.pipelines.evaluate.nodes import ServingConfig
    from pneumonia_kedro.pipelines.inference.nodes import InferenceConfig
    from pneumonia_kedro.pipelines.ingest.nodes import IngestConfig

    for cls, group in ((IngestConfig, "ingest"), (InferenceConfig, "inference"),
                       (ServingConfig, "serving")):
        with pytest.raises(ConfigError, match=rf"params:{group}: unknown key\(s\) \['quality'\]"):
            from_params(cls, {"quality": {"not_chest": "warn"}}, group)
    # The per-use differences, as conf/base sets them.
    assert TRAINING.policies["not_chest"] == "warn" and INFERENCE.policies["not_chest"] == "skip"
    assert TRAINING.colour == "error" and INFERENCE.colour == "skip"
    assert TRAINING.reference is None and TRAINING.min_side == INFERENCE.min_side == 256


def changed(path: str, value: object) -> dict:
    params = copy.deepcopy(PARAMS)
    *parents, last = path.split(".")
    target = params
    for key in parents:
        target = target[key]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return params


@pytest.mark.parametrize(("path", "value", "message"), [
    ("policies.lateral_view.inference", "ignore",
     r"params:quality.policies.lateral_view.inference = 'ignore'; allowed values: warn, skip, "
     "error"),
    ("policies.colour.training", "warn",
     r"params:quality.policies.colour.training = 'warn'; allowed values: skip, error"),
    ("policies.appearance.training", "warn",
     r"params:quality.policies.appearance.training: the appearance check has no training "
     "policy"),
    ("policies.modality", None, r"params:quality.policies: missing key\(s\) \['modality'\]"),
    ("policies.not_chest.training", None,
     r"params:quality.policies.not_chest: missing key\(s\) \['training'\]"),
    ("policies.bodypart", {"training": "warn", "inference": "skip"},
     r"params:quality.policies: unknown key\(s\) \['bodypart'\]"),
    ("min_side", 0, "params:quality.min_side = 0 is out of range: it must be >= 1"),
    ("max_aspect_ratio", 0.5, "params:quality.max_aspect_ratio = 0.5 is out of range: it "
                              "must be >= 1"),
    ("near_constant_levels", 300, "params:quality.near_constant_levels = 300 is out of range"),
    ("appearance.quantile", 1.5, "params:quality.appearance.quantile = 1.5 is out of range"),
    ("appearance.margin", None, r"params:quality.appearance: missing key\(s\) \['margin'\]"),
])
def test_bad_gate_settings_name_the_key(path, value, message):
    with pytest.raises(ConfigError, match=message):
        quality_settings(changed(path, value))


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
    quality = gate(near_constant="skip", colour="skip")
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
                         quality=gate(lateral_view="error"))
    with pytest.raises(InputQualityError, match=r"lateral\.dcm: quality gate lateral_view"):
        build(plan(folder, folder.patient_ids, strict), tmp_path / "strict")


def test_gate_settings_are_part_of_the_cache_fingerprint(tmp_path, chest):
    folder = write_folder(tmp_path, {"a": native_dicom(chest.pixels)})
    base = CacheConfig(image_size=64, workers=0, progress=False, quality=TRAINING)
    warn = plan(folder, ["a"], base).fingerprint()
    assert warn != plan(folder, ["a"], dataclasses.replace(
        base, quality=gate(near_constant="skip"))).fingerprint()
    assert warn != plan(folder, ["a"], dataclasses.replace(base, on_error="skip")).fingerprint()
    assert warn != plan(folder, ["a"], dataclasses.replace(base, quality=None)).fingerprint()
