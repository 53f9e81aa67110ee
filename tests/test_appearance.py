"""The quality gate's header-free check: how far an image lies from the training images,
calibrated on a real training cache of demo images, applied by the inference gate."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from pneumonia_kedro.config import ConfigError
from pneumonia_kedro.demo import DemoConfig
from pneumonia_kedro.dicom import decode
from pneumonia_kedro.dicom.appearance import MIN_IMAGES, calibrate, features
from pneumonia_kedro.dicom.quality import QualityConfig
from pneumonia_kedro.dicom.quality_settings import inference_gate
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, decode_checked, plan
from pneumonia_kedro.pipelines.cache.nodes import calibrate_appearance
from tests.demo_folder import write_demo_folder
from tests.dicom_files import native_dicom
from tests.test_dicom_quality import PARAMS, TRAINING

SIZE = 128  # cache size of the test: the features do not depend on it


def demo_folder(folder: Path, seed: int, n: int) -> list[Path]:
    write_demo_folder(folder, DemoConfig(n_positive=n // 2, n_negative=n - n // 2, n_test=0,
                                         seed=seed, difficulty=0.6))
    return sorted(folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def training_cache(tmp_path_factory) -> ImageCache:
    from pneumonia_kedro.dicom import DicomFolder

    root = tmp_path_factory.mktemp("appearance")
    demo_folder(root / "train", seed=11, n=40)
    folder = DicomFolder.scan(str(root / "train"))
    config = CacheConfig(image_size=SIZE, workers=0, progress=False, quality=TRAINING)
    build(plan(folder, folder.patient_ids, config), root / "cache")
    return ImageCache(root / "cache")


@pytest.fixture(scope="module")
def calibration(training_cache) -> dict:
    return calibrate_appearance(training_cache, PARAMS)


@pytest.fixture(scope="module")
def gate(calibration) -> QualityConfig:
    return inference_gate(PARAMS, calibration)


@pytest.mark.slow  # trains or builds several networks: outside the quick loop
def test_the_calibration_node_writes_a_reference_from_the_training_cache(calibration):
    assert calibration["training_images"] == 40 and calibration["reason"] == ""
    reference = calibration["reference"]
    assert reference["images"] == 40 and len(reference["directions"]) == 10
    quantiles = calibration["held_out_distance_quantiles"]
    # threshold = 0.99 quantile of held-out distances x margin 1.25 (parameters_quality.yml)
    assert quantiles["0.5"] < quantiles["0.99"] < reference["threshold"]
    assert json.loads(json.dumps(calibration)) == calibration  # the JSON dataset saves it


def test_new_chest_images_pass(gate, tmp_path):
    for path in demo_folder(tmp_path, seed=12, n=10):
        image, reason, flags = decode_checked(path.read_bytes(), path.name, SIZE, gate)
        assert image is not None and reason == "" and "appearance" not in flags, flags


def _header_lying(pixels: np.ndarray) -> bytes:
    """``pixels`` saved as a frontal chest radiograph (CR, secondary capture, CHEST, PA)."""
    return native_dicom(pixels)


def _patterns() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:512, 0:512]
    return {"ramp": (xx // 2).astype(np.uint8),
            "bars": ((xx // 64) % 2 * 255).astype(np.uint8),
            "ct_slice": decode(Path(get_testdata_file("693_J2KI.dcm")).read_bytes(),
                               "ct").pixels,
            "mr_abdomen": decode(Path(get_testdata_file("examples_overlay.dcm")).read_bytes(),
                                 "mr").pixels}


@pytest.mark.parametrize("name", ["ramp", "bars", "ct_slice", "mr_abdomen"])
def test_non_chest_pixels_under_a_chest_header_are_skipped(gate, name):
    """Every header check passes these files; before the appearance check they were
    predicted like chest X-rays."""
    data = _header_lying(_patterns()[name])
    assert decode_checked(data, f"{name}.dcm", SIZE, dataclasses.replace(
        gate, reference=None))[0] is not None  # no header check sees it
    image, reason, flags = decode_checked(data, f"{name}.dcm", SIZE, gate)
    assert image is None
    assert reason.startswith(f"{name}.dcm: quality gate appearance: appearance distance ")
    assert "not like the chest X-rays the model was trained on" in reason


def test_a_full_size_image_and_its_cached_copy_lie_at_the_same_distance(gate, training_cache):
    reference = gate.reference
    record = training_cache.usable.iloc[0].to_dict()
    box = training_cache.letterbox_from_record(record)
    cached = training_cache.images[record["row"]][
        box.offset_y:box.offset_y + box.resized_height,
        box.offset_x:box.offset_x + box.resized_width]
    from tests.demo_folder import one_demo_file

    full = decode(one_demo_file(seed=5), "full.dcm").pixels  # 1024 x 1024
    small = np.asarray(__import__("cv2").resize(full, (SIZE, SIZE),
                                                interpolation=__import__("cv2").INTER_AREA))
    assert abs(reference.distance(features(full)) - reference.distance(features(small))) \
        < 0.05 * reference.threshold
    assert reference.distance(features(cached)) < reference.threshold


def test_without_a_reference_the_check_is_off_and_says_why(training_cache, caplog):
    few = calibrate_appearance(_FewImages(training_cache), PARAMS)
    assert few["reference"] is None
    assert few["reason"] == f"{MIN_IMAGES - 1} training image(s); the appearance reference " \
                            f"needs at least {MIN_IMAGES}"
    with caplog.at_level(logging.WARNING):
        gate = inference_gate(PARAMS, few)
    assert gate.reference is None
    assert "the quality gate's appearance check is off: 7 training image(s)" in caplog.text


class _FewImages:
    """The training cache with only its first MIN_IMAGES - 1 images usable."""

    def __init__(self, cache: ImageCache) -> None:
        self.images = cache.images
        self.usable = cache.usable.iloc[:MIN_IMAGES - 1]
        self.letterbox_from_record = cache.letterbox_from_record


def test_a_reference_of_other_features_is_refused(calibration):
    stale = {**calibration, "reference": {**calibration["reference"], "version": 0}}
    with pytest.raises(ConfigError, match=r"appearance_reference: appearance reference of "
                                          r"features version 0.*kedro run --pipelines cache"):
        inference_gate(PARAMS, stale)


def test_the_served_model_gets_the_same_gate(gate):
    settings = json.loads(json.dumps(gate.as_dict()))  # as package_model saves it
    assert QualityConfig.from_dict(settings) == gate
    with pytest.raises(ValueError, match=r"lack \['appearance', .*package the model again"):
        QualityConfig.from_dict({k: v for k, v in settings.items()
                                 if k not in ("appearance", "modality")})


def test_calibration_needs_enough_images():
    with pytest.raises(ValueError, match="3 training image"):
        calibrate(np.zeros((3, 272)), 10, 0.99, 1.25)
