"""Inference on a folder of mixed DICOMs: bad files reported, others predicted in original
pixel coordinates, and the submission's two no-box conventions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file

from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.ensemble import Ensemble
from pneumonia_kedro.imagecache import ImageCache, build
from pneumonia_kedro.models import TrainedModel, build_model
from pneumonia_kedro.pipelines.inference.nodes import (
    plan_test_cache,
    predict_test,
    write_structured_reports,
    write_submission,
)
from pneumonia_kedro.submission import (
    SubmissionError,
    build_submission,
    check_against_sample,
    parse_prediction_string,
)
from tests.conftest import write_demo_dicoms
from tests.test_training import TINY_MODEL

PARAMS = {"cache": {"workers": 0, "progress": False}, "progress": False}
# The nuclear-medicine test file says WHOLE BODY: only warn, to check non-square geometry.
LENIENT = {**PARAMS, "quality": {"not_chest": "warn"}}
# Keep every box an untrained model proposes, so coordinates can be checked.
POSTPROCESSING = {"score_threshold": 0.0, "nms_iou": 0.5, "max_boxes": 5, "shrink": 1.0}


@pytest.fixture(scope="module")
def incoming(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("incoming")
    write_demo_dicoms(folder, n_positive=1, n_negative=1, seed=9)
    # 1024 rows x 256 columns, 12-bit JPEG Extended: non-square, not 8-bit, not 1024 wide.
    (folder / "narrow.dcm").write_bytes(Path(get_testdata_file("JPGExtended.dcm")).read_bytes())
    (folder / "corrupt.dcm").write_bytes(np.random.default_rng(1).bytes(3000))
    return folder


def run_inference(incoming: Path, folder: Path, params: dict) -> tuple:
    """The inference nodes with an untrained tiny model: (model, dicoms, cache, predictions,
    submission, report)."""
    torch_model = build_model(TINY_MODEL)
    trained = Ensemble.of(TrainedModel(config=TINY_MODEL, state_dict=torch_model.state_dict(),
                                       info={}), None)
    dicoms = DicomFolder.scan(str(incoming))
    build(plan_test_cache(dicoms, trained, params), folder / "cache")
    cache = ImageCache(folder / "cache")
    predictions = predict_test(trained, cache, POSTPROCESSING, params)
    submission, report = write_submission(predictions, cache, dicoms, pd.DataFrame(), params)
    return trained, dicoms, cache, predictions, submission, report


def test_bad_file_is_reported_and_the_others_predicted_in_original_pixels(incoming, tmp_path):
    trained, dicoms, cache, predictions, submission, report = run_inference(
        incoming, tmp_path, LENIENT)

    assert submission["patientId"].tolist() == sorted(dicoms.patient_ids)
    assert report["skipped"]["count"] == 1
    assert "not a DICOM file" in report["skipped"]["first"]["corrupt"]
    assert report["predicted"] == 3 and report["files"] == 4
    flags = report["quality_flags"]
    assert flags["counts"] == {"aspect_ratio": 1, "not_chest": 1, "unknown_view": 1}
    assert flags["files"]["count"] == 1
    assert flags["files"]["first"]["narrow"].startswith("not_chest: BodyPartExamined is WHOLE "
                                                        "BODY")
    assert "aspect ratio 4.00 above 1.6" in flags["files"]["first"]["narrow"]
    assert submission.set_index("patientId").loc["corrupt", "PredictionString"] == ""

    narrow = predictions.loc[predictions["patientId"] == "narrow"]
    assert len(narrow), "the untrained model proposes boxes on every image"
    letterbox = cache.letterbox("narrow")
    assert (letterbox.offset_x, letterbox.offset_y) == (24, 0)  # 16 px wide image in 64 px
    assert (narrow["x"] >= 0).all() and (narrow["x"] + narrow["width"] <= 256 + 1e-6).all()
    assert (narrow["y"] >= 0).all() and (narrow["y"] + narrow["height"] <= 1024 + 1e-6).all()
    assert set(predictions["view_position"].dropna()) <= {"AP", "PA", ""}
    assert predictions["image_probability"].between(0, 1).all()

    # Off: one empty chunk, so the dataset still clears an earlier run's reports.
    assert list(write_structured_reports(predictions, cache, dicoms, trained, LENIENT)) == [{}]
    chunks = list(write_structured_reports(predictions, cache, dicoms, trained,
                                           {**LENIENT, "dicom_sr": True}))
    assert len(chunks) == 1 and all(isinstance(v, bytes) for v in chunks[0].values())
    reports = chunks[0]
    assert sorted(reports) == sorted(cache.usable["patientId"])  # not the corrupt file
    strings = submission.set_index("patientId")["PredictionString"]
    for patient_id, report in reports.items():
        check_report_against_submission(report, dicoms.read_bytes(patient_id),
                                        strings[patient_id])


def check_report_against_submission(report: bytes, source: bytes, prediction_string: str
                                    ) -> None:
    """The SR's polylines lie within 0.5 px of the submission's boxes, on the source's
    geometry (square or not), and reference the source image."""
    import io

    import highdicom as hd
    import pydicom

    sr = hd.sr.srread(io.BytesIO(report))
    original = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True)
    assert sr.StudyInstanceUID == original.StudyInstanceUID
    boxes, scores = parse_prediction_string(prediction_string)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(boxes)
    for group, (x, y, width, height) in zip(groups, boxes, strict=True):
        points = np.asarray(group.roi.value)
        np.testing.assert_allclose(points[[0, 2]], [[x, y], [x + width, y + height]],
                                   atol=0.5)
        assert (points[:, 0] <= original.Columns + 0.5).all()
        assert (points[:, 1] <= original.Rows + 0.5).all()
        reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == original.SOPInstanceUID


def test_no_box_conventions_and_sample_check():
    predictions = pd.DataFrame({"patientId": ["a"], "x": [10.0], "y": [20.0], "width": [30.0],
                                "height": [40.0], "score": [0.9]})
    empty = build_submission(predictions, ["a", "b"])
    assert empty["PredictionString"].tolist() == ["0.9000 10.0 20.0 30.0 40.0", ""]
    notebook = build_submission(predictions, ["a", "b"], no_box="whole_image",
                                image_sizes={"b": (1024, 256)})
    assert notebook["PredictionString"].tolist()[1] == "0.0000 0.0 0.0 256.0 1024.0"
    assert check_against_sample(empty, pd.DataFrame({"patientId": ["b", "a"]})) == {
        "checked_against_sample": True}
    with pytest.raises(SubmissionError, match="1 missing"):
        check_against_sample(empty, pd.DataFrame({"patientId": ["a", "b", "c"]}))


def test_default_gate_skips_what_the_model_was_not_trained_for(incoming, tmp_path):
    *_, predictions, submission, report = run_inference(incoming, tmp_path, PARAMS)
    assert sorted(report["skipped"]["first"]) == ["corrupt", "narrow"]
    assert report["skipped"]["first"]["narrow"] == (
        f"{incoming / 'narrow.dcm'}: quality gate not_chest: BodyPartExamined is WHOLE BODY, "
        "not the chest")
    assert "narrow" not in set(predictions["patientId"])
    assert submission.set_index("patientId").loc["narrow", "PredictionString"] == ""


@pytest.mark.slow  # two detectors, four variants, three IoUs: outside the quick loop
def test_variants_kept_apart_then_fused_equal_fusing_while_predicting(incoming, tmp_path):
    """What evaluation does (predict keeping the variants, then fuse and post-process at each
    fusion IoU) equals what inference and the served model deliver, letterboxed image too."""
    import dataclasses

    import torch

    from pneumonia_kedro.ensemble import Networks
    from pneumonia_kedro.inference import cached_squares
    from pneumonia_kedro.postprocess import PostprocessConfig
    from pneumonia_kedro.prediction import TTAConfig, postprocessed, predict

    torch.manual_seed(0)
    first = build_model(TINY_MODEL).eval()
    torch.manual_seed(1)
    second = build_model(TINY_MODEL).eval()
    dicoms = DicomFolder.scan(str(incoming))
    member = Ensemble.of(TrainedModel(config=TINY_MODEL, state_dict=first.state_dict(),
                                      info={}), None)
    build(plan_test_cache(dicoms, member, LENIENT), tmp_path / "cache")
    cache = ImageCache(tmp_path / "cache")  # holds the non-square (letterboxed) image too
    squares = cached_squares(cache)
    assert cache.letterbox("narrow").offset_x == 24
    networks = Networks([first, second], [], [], torch.device("cpu"))
    tta = TTAConfig(hflip=True)
    values = PostprocessConfig(score_threshold=0.05, nms_iou=0.5, max_boxes=5)
    apart = predict(networks, squares, tta, None, 4).variants
    assert set(apart["variants"]) == {4} and set(apart["variant"]) == {0, 1, 2, 3}
    for iou in (0.3, 0.55, 0.8):
        at_iou = dataclasses.replace(tta, fusion_iou=iou)
        delivered = predict(networks, squares, at_iou, values, 4)
        later, candidates, probability = postprocessed(apart, at_iou, values,
                                                       patient_ids=delivered.patient_ids)
        assert len(later) and set(later["patientId"]) >= {"narrow"}
        pd.testing.assert_frame_equal(later, delivered.boxes)
        pd.testing.assert_frame_equal(candidates, delivered.candidates)
        pd.testing.assert_series_equal(probability, delivered.image_probability)
        narrow = later.loc[later["patientId"] == "narrow"]
        assert (narrow["x"] >= 0).all() and (narrow["x"] + narrow["width"] <= 256).all()
    # One model without variants: nothing to fuse, boxes only clipped to the image.
    one = predict(dataclasses.replace(networks, detectors=[first]), squares, None, None, 4)
    assert set(one.variants["variants"]) == {1}
    kept = PostprocessConfig(score_threshold=0.0, nms_iou=1.0, max_boxes=1000)
    boxes, _, _ = postprocessed(one.variants, TTAConfig(), kept)
    assert len(boxes) == len(one.variants)
    assert (boxes["x"] >= 0).all() and (boxes["y"] >= 0).all()
