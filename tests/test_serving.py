"""The served MLflow model's ``predict`` on DICOM files written by pydicom: answers in request
order (duplicates too), files the gate skips, and bad requests refused as HTTP 400."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from pneumonia_kedro.classifier import TrainedClassifier, build_classifier
from pneumonia_kedro.ensemble import Ensemble, save_ensemble
from pneumonia_kedro.imagecache import decode_checked, preprocess
from pneumonia_kedro.inference import Square
from pneumonia_kedro.models import TrainedModel, build_model
from pneumonia_kedro.prediction import predict, prediction_settings
from pneumonia_kedro.serving import OpacityDetector
from tests.dicom_files import native_dicom
from tests.submission_format import parse_prediction_string
from tests.test_dicom_quality import INFERENCE
from tests.test_training import TINY_MODEL

POSTPROCESS = {"score_threshold": 0.0, "nms_iou": 0.5, "max_boxes": 3, "shrink": 1.0,
               "tta": {"hflip": True, "scales": [1.0], "fusion_iou": 0.55, "skip_score": 0.0}}


def _chest(seed: int, rows: int = 320, columns: int = 256, **attributes: object) -> bytes:
    """A frontal chest-like file: noise with a bright patch, not square (letterboxed)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(20, 120, size=(rows, columns)).astype(np.uint8)
    pixels[60:160, 40:120] = 230
    # The patient and study modules a structured report copies.
    study = {"PatientBirthDate": "19600101", "PatientSex": "F", "StudyDate": "20240101",
             "StudyTime": "120000", "StudyID": "1", "AccessionNumber": "A1",
             "ReferringPhysicianName": ""}
    return native_dicom(pixels, PatientID=f"p{seed}", **study, **attributes)


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {"a": _chest(1), "b": _chest(2, rows=256, columns=256),
            "tiny": _chest(3, rows=64, columns=64),  # below min_side 256: skipped
            "lateral": _chest(4, ViewPosition="LL")}  # skipped as well


def _load(folder: Path, **settings: object) -> OpacityDetector:
    """The pyfunc as ``mlflow models serve`` loads it: from its artifact files."""
    torch.manual_seed(0)
    detector = TrainedModel(config=TINY_MODEL, state_dict=build_model(TINY_MODEL).state_dict(),
                            info={})
    classifier = TrainedClassifier("resnet18", 32, build_classifier("resnet18").state_dict(),
                                   {})
    artifacts = {"weights": folder / "weights.pt", "classifier": folder / "classifier.pt",
                 "settings": folder / "settings.json"}
    assert save_ensemble(Ensemble.of(detector, classifier), artifacts["weights"],
                         artifacts["classifier"])
    artifacts["settings"].write_text(json.dumps({
        "image_size": TINY_MODEL.image_size, "postprocess": POSTPROCESS,
        "max_files_per_request": 6, "max_file_bytes": 2**20,
        "quality": INFERENCE.as_dict(), **settings}))
    model = OpacityDetector()
    model.load_context(SimpleNamespace(artifacts={k: str(v) for k, v in artifacts.items()}))
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> OpacityDetector:
    return _load(tmp_path_factory.mktemp("model"))


def _request(files: dict[str, bytes], names: list[str], ids: bool = True) -> pd.DataFrame:
    request = {"dicom": [base64.b64encode(files[name]).decode("ascii") for name in names]}
    return pd.DataFrame({"patientId": names, **request} if ids else request)


def _bad_request(model: OpacityDetector, request: object, match: str) -> None:
    with pytest.raises(MlflowException, match=match) as caught:
        model.predict(None, request)
    assert caught.value.get_http_status_code() == 400


def test_rows_come_back_in_order_with_duplicates_and_skipped_files(served, files):
    names = ["tiny", "a", "b", "a", "lateral"]
    answer = served.predict(None, _request(files, names))
    assert answer["patientId"].tolist() == names
    assert list(answer.columns[:2]) == ["patientId", "PredictionString"]
    skipped = answer.loc[answer["patientId"].isin(["tiny", "lateral"])]
    assert (skipped["PredictionString"] == "").all()
    assert skipped["image_probability"].isna().all()
    assert skipped["classifier_probability"].isna().all()
    assert "tiny_image" in skipped["skip_reason"].iloc[0]
    assert "lateral_view" in skipped["skip_reason"].iloc[1]
    predicted = answer.loc[answer["patientId"].isin(["a", "b"])]
    assert (predicted["skip_reason"] == "").all()
    assert predicted["PredictionString"].str.len().gt(0).all()  # threshold 0: boxes
    assert predicted["classifier_probability"].between(0, 1).all()
    # The same file twice is two rows with the same answer.
    twice = answer.loc[answer["patientId"] == "a"].drop(columns="patientId")
    pd.testing.assert_frame_equal(twice.iloc[[0]].reset_index(drop=True),
                                  twice.iloc[[1]].reset_index(drop=True))
    # Boxes in the file's own pixels (256 columns x 320 rows), best first.
    boxes, scores = parse_prediction_string(answer.loc[1, "PredictionString"])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 256.05).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 320.05).all()
    assert list(scores) == sorted(scores, reverse=True) and len(scores) <= 3
    assert answer.loc[1, "image_probability"] == pytest.approx(scores[0], abs=1e-4)


@pytest.mark.slow  # predicts twice: outside the quick loop
def test_the_answer_is_prediction_predict_on_the_decoded_files(served, files):
    """OpacityDetector.predict adds decoding and the response's shape, nothing else."""
    answer = served.predict(None, _request(files, ["b", "a"], ids=False))
    assert answer["patientId"].tolist() == ["row0", "row1"]
    squares = []
    for key, name in (("0", "b"), ("1", "a")):
        image, _, _ = decode_checked(files[name], name, TINY_MODEL.image_size, served.quality)
        squares.append(Square(key, *preprocess(image, TINY_MODEL.image_size)))
    tta, values = prediction_settings(POSTPROCESS)
    expected = predict(served.networks, squares, tta, values)
    for row, key in enumerate(["0", "1"]):
        rows = expected.boxes.loc[expected.boxes["patientId"] == key]
        boxes, scores = parse_prediction_string(answer.loc[row, "PredictionString"])
        np.testing.assert_allclose(boxes, rows[["x", "y", "width", "height"]], atol=0.05)
        np.testing.assert_allclose(scores, rows["score"], atol=5e-5)
        assert answer.loc[row, "classifier_probability"] == pytest.approx(
            expected.classifier_probability[key], abs=1e-6)


@pytest.mark.slow  # loads a second model: outside the quick loop
def test_an_image_without_a_box_follows_the_no_box_convention(tmp_path, files):
    model = _load(tmp_path, no_box="whole_image")
    model.postprocess = dataclasses.replace(model.postprocess, score_threshold=1.0)
    answer = model.predict(None, _request(files, ["a", "tiny"]))
    # Predicted without a box: the whole image; skipped by the gate: nothing.
    assert answer["PredictionString"].tolist() == ["0.0000 0.0 0.0 256.0 320.0", ""]


@pytest.mark.slow  # loads a second model: outside the quick loop
def test_a_structured_report_answers_each_predicted_file(tmp_path, files):
    import highdicom as hd
    import pydicom

    model = _load(tmp_path, dicom_sr=True)
    answer = model.predict(None, _request(files, ["a", "tiny"]))
    assert answer.loc[1, "dicom_sr"] == ""
    report = hd.sr.srread(io.BytesIO(base64.b64decode(answer.loc[0, "dicom_sr"])))
    source = pydicom.dcmread(io.BytesIO(files["a"]), stop_before_pixels=True)
    assert report.StudyInstanceUID == source.StudyInstanceUID
    boxes, _ = parse_prediction_string(answer.loc[0, "PredictionString"])
    assert len(report.content.get_planar_roi_measurement_groups()) == len(boxes)


def test_bad_requests_are_refused_with_http_400(served, files, tmp_path):
    _bad_request(served, pd.DataFrame({"file": ["x"]}), "needs a 'dicom' column")
    _bad_request(served, ["not", "a", "table"], "needs a 'dicom' column")
    _bad_request(served, _request(files, ["a"] * 7), "7 files in one request; at most 6")
    junk = pd.DataFrame({"dicom": ["a", base64.b64encode(b"no dicom here").decode()]})
    junk.loc[0, "dicom"] = base64.b64encode(files["a"]).decode()
    _bad_request(served, junk, "row 1: .*not a DICOM file")
    _bad_request(served, pd.DataFrame({"dicom": ["%%% not base64 %%%"]}),
                 "row 0: 'dicom' is neither base64 DICOM bytes nor an allowed path")
    _bad_request(served, pd.DataFrame({"dicom": [12345]}),
                 "row 0: 'dicom' must be bytes or base64 text, got int")
    # Paths are not read unless the model was logged with allow_paths.
    path = tmp_path / "a.dcm"
    path.write_bytes(files["a"])
    _bad_request(served, pd.DataFrame({"dicom": [str(path)]}), "nor an allowed path")
    big = pd.DataFrame({"dicom": [files["a"] + bytes(2**20)]})
    _bad_request(served, big, f"row 0: file larger than {2**20} bytes")


@pytest.mark.slow  # loads a second model: outside the quick loop
def test_paths_and_raw_bytes_are_read_and_an_error_policy_refuses(tmp_path, files):
    model = _load(tmp_path, allow_paths=True,
                  quality=dataclasses.replace(INFERENCE, lateral_view="error",
                                              tiny_image="skip").as_dict())
    path = tmp_path / "a.dcm"
    path.write_bytes(files["a"])
    answer = model.predict(None, pd.DataFrame({"dicom": [str(path), files["b"]]}))
    assert (answer["PredictionString"].str.len() > 0).all()
    _bad_request(model, pd.DataFrame({"dicom": [files["lateral"]]}),
                 "row 0: .*lateral_view.*policy error")
