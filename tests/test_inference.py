"""Inference on a folder of mixed DICOMs: bad files reported, others predicted in original
pixel coordinates, and the submission's two no-box conventions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner  # configures logging: before caplog's handler
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
)
from tests.conftest import PROJECT_ROOT, write_demo_dicoms
from tests.submission_format import parse_prediction_string
from tests.test_training import TINY_MODEL

# The inference pipeline's nodes on real DICOMs and models: outside the quick loop.
pytestmark = pytest.mark.slow

PARAMS = {"cache": {"workers": 0, "progress": False}, "progress": False}
QUALITY = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_quality.yml").read_text())[
    "quality"]
# The nuclear-medicine test file (Modality NM) says WHOLE BODY: only warn, to check
# non-square geometry.
LENIENT = {**PARAMS, "quality": {**QUALITY, "policies": {
    **QUALITY["policies"], "not_chest": {"training": "warn", "inference": "warn"},
    "modality": {"training": "warn", "inference": "warn"}}}}
# Keep every box an untrained model proposes, so coordinates can be checked.
POSTPROCESSING = {"score_threshold": 0.0, "nms_iou": 0.5, "max_boxes": 5, "shrink": 1.0}


def tuned_for(ensemble: Ensemble) -> dict:
    """``POSTPROCESSING`` as if tuned for ``ensemble`` (inference refuses it for others)."""
    return {**POSTPROCESSING, "models": ensemble.record()}


@pytest.fixture(scope="module")
def incoming(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("incoming")
    write_demo_dicoms(folder, n_positive=1, n_negative=1, seed=9)
    # 1024 rows x 256 columns, 12-bit JPEG Extended: non-square, not 8-bit, not 1024 wide.
    (folder / "narrow.dcm").write_bytes(Path(get_testdata_file("JPGExtended.dcm")).read_bytes())
    (folder / "corrupt.dcm").write_bytes(np.random.default_rng(1).bytes(3000))
    return folder


def _inference(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "quality"}


def _quality(params: dict) -> dict:
    return params.get("quality", QUALITY)


def run_inference(incoming: Path, folder: Path, params: dict) -> tuple:
    """The inference nodes with an untrained tiny model: (model, dicoms, cache, predictions,
    submission, report)."""
    torch_model = build_model(TINY_MODEL)
    trained = Ensemble.of(TrainedModel(config=TINY_MODEL, state_dict=torch_model.state_dict(),
                                       info={}), None)
    dicoms = DicomFolder.scan(str(incoming))
    build(plan_test_cache(dicoms, trained, _inference(params), _quality(params), None),
          folder / "cache")
    cache = ImageCache(folder / "cache")
    predictions = predict_test(trained, cache, tuned_for(trained), _inference(params))
    submission, report, saved = write_submission(predictions, cache, dicoms, pd.DataFrame(),
                                                 {}, _inference(params))
    assert saved is predictions  # saved with the submission, as test_predictions
    return trained, dicoms, cache, predictions, submission, report


def test_bad_file_is_reported_and_the_others_predicted_in_original_pixels(incoming, tmp_path):
    trained, dicoms, cache, predictions, submission, report = run_inference(
        incoming, tmp_path, LENIENT)

    assert submission["patientId"].tolist() == sorted(dicoms.patient_ids)
    assert report["skipped"]["count"] == 1
    assert "not a DICOM file" in report["skipped"]["first"]["corrupt"]
    assert report["predicted"] == 3 and report["files"] == 4
    flags = report["quality_flags"]
    assert flags["counts"] == {"aspect_ratio": 1, "modality": 1, "not_chest": 1,
                               "unknown_view": 1}
    assert flags["files"]["count"] == 1
    assert flags["files"]["first"]["narrow"].startswith(
        "modality: Modality NM: the model knows chest radiographs (CR, DX); not_chest: "
        "BodyPartExamined is WHOLE BODY")
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

    # Off: one empty last chunk, so the dataset still replaces an earlier run's reports.
    ((off, no_skips),) = write_structured_reports(predictions, cache, dicoms, trained,
                                                  _inference(LENIENT), pd.DataFrame())
    assert (off, off.last, no_skips) == ({}, True, {})
    chunks = list(write_structured_reports(predictions, cache, dicoms, trained,
                                           {**_inference(LENIENT), "dicom_sr": True},
                                           pd.DataFrame()))
    ((reports, skips),) = chunks
    assert reports.last and skips == {}
    assert all(isinstance(v, bytes) for v in reports.values())
    assert sorted(reports) == sorted(cache.usable["patientId"])  # not the corrupt file
    strings = submission.set_index("patientId")["PredictionString"]
    for patient_id, report in reports.items():
        check_report_against_submission(report, dicoms.read_bytes(patient_id),
                                        strings[patient_id])


def _no_study_uid(data: bytes) -> bytes:
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.StudyInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Three demo files, a copy of one without StudyInstanceUID, a file named ``.DCM`` and a
    subfolder of DICOMs."""
    folder = tmp_path_factory.mktemp("mixed")
    write_demo_dicoms(folder, n_positive=2, n_negative=1, seed=11)
    first = sorted(folder.glob("*.dcm"))[0].read_bytes()
    (folder / "nostudy.dcm").write_bytes(_no_study_uid(first))
    (folder / "UPPER.DCM").write_bytes(first)
    (folder / "series1").mkdir()
    (folder / "series1" / "inside.dcm").write_bytes(first)
    return folder


def run_pipeline(incoming: Path, out: Path, params: dict, sample: pd.DataFrame | None = None
                 ) -> dict:
    """The inference pipeline from prediction on, with the project's own datasets writing the
    outputs into ``out`` (an untrained tiny model over a built cache; ``sample``: the sample
    submission, none by default)."""
    import yaml
    from kedro_datasets.json import JSONDataset
    from kedro_datasets.pandas import CSVDataset, ParquetDataset

    from pneumonia_kedro.datasets import DicomFolderDataset
    from pneumonia_kedro.pipelines import inference

    trained = Ensemble.of(TrainedModel(config=TINY_MODEL, state_dict=build_model(
        TINY_MODEL).state_dict(), info={}), None)
    dicoms = DicomFolder.scan(str(incoming))
    cache_folder = out.parent / f"{out.name}_cache"
    if not cache_folder.exists():  # the project's quality gate, no appearance reference
        quality = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_quality.yml"
                                  ).read_text())["quality"]
        build(plan_test_cache(dicoms, trained, params, quality, None), cache_folder)
    memory = {"ensemble": trained, "test_image_cache": ImageCache(cache_folder),
              "postprocessing": tuned_for(trained),
              "sample_submission": pd.DataFrame() if sample is None else sample,
              "params:inference": params, "params:engine": "local"}
    catalog = DataCatalog(datasets={
        **{name: MemoryDataset(value, copy_mode="assign") for name, value in memory.items()},
        "test_dicoms": DicomFolderDataset(path=str(incoming)),
        "test_predictions": ParquetDataset(filepath=str(out / "test_predictions.parquet")),
        "submission": CSVDataset(filepath=str(out / "submission.csv"),
                                 save_args={"index": False}),
        "inference_report": JSONDataset(filepath=str(out / "inference_report.json")),
        "structured_reports": DicomFolderDataset(path=str(out / "structured_reports"),
                                                 overwrite=True)})
    pipeline = inference.create_pipeline(folds=1).from_nodes("predict_test_node")
    SequentialRunner().run(pipeline, catalog)
    return json.loads((out / "inference_report.json").read_text())


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


SR_ON = {**PARAMS, "dicom_sr": True}


def test_an_image_that_cannot_get_an_sr_is_skipped_with_its_reason(mixed, tmp_path, caplog):
    """It stopped the run, after the earlier run's SRs were deleted."""
    with caplog.at_level("WARNING", logger="pneumonia_kedro"):
        report = run_pipeline(mixed, tmp_path / "out", SR_ON)
    written = sorted(p.stem for p in (tmp_path / "out/structured_reports").glob("*.dcm"))
    assert report["predicted"] == 4 and len(written) == 3 and "nostudy" not in written
    assert report["structured_reports"]["written"] == 3
    assert report["structured_reports"]["skipped"]["first"] == {"nostudy": (
        f"{mixed / 'nostudy.dcm'}: no StudyInstanceUID: a structured report cannot "
        "reference this image")}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "1 predicted image(s) got no DICOM SR; the reasons are in inference_report.json " \
           "structured_reports" in warnings
    # The .DCM file and the subfolder were silent omissions from the submission.
    assert (f"2 entries of {mixed} are not read, so not in the submission: 1 x a subfolder: "
            "images must lie directly in the folder; 1 x file name ends in '.DCM', not '.dcm' "
            "(names are case-sensitive); listed in inference_report.json rejected_files"
            ) in warnings


def test_a_run_that_stops_leaves_the_earlier_output_set_whole(mixed, tmp_path, monkeypatch):
    """SRs, submission, report and predictions: the earlier run's, all of them, when a run
    stops while writing the SRs (the SR folder was emptied and the predictions replaced)."""
    from pneumonia_kedro.pipelines.inference import nodes

    out = tmp_path / "out"
    run_pipeline(mixed, out, SR_ON)
    before = _snapshot(out)
    assert len([name for name in before if name.startswith("structured_reports/")]) == 3
    real, made = nodes.report_bytes, []

    def failing(*args, **kwargs) -> bytes:
        if made:
            raise OSError("No space left on device")
        made.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(nodes, "report_bytes", failing)
    monkeypatch.setattr(nodes, "SR_CHUNK", 1)  # the first SR is saved before the failure
    with pytest.raises(OSError, match="No space left"):
        run_pipeline(mixed, out, {**SR_ON, "no_box": "whole_image"})
    (aside,) = out.glob(".structured_reports.partial-*")  # the stopped run's first SR
    assert made and len(list(aside.iterdir())) == 1
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith(".")} == before
    monkeypatch.setattr(nodes, "report_bytes", real)
    run_pipeline(mixed, out, SR_ON)  # the next run removes what the stopped one left
    assert sorted(p.name for p in out.iterdir()) == [
        "inference_report.json", "structured_reports", "submission.csv",
        "test_predictions.parquet"]


def test_a_test_set_unlike_the_sample_submission_replaces_no_output(mixed, tmp_path):
    """The sample-submission check ran after the SRs had been swapped in: a failing check
    left the new SRs beside the earlier run's submission."""
    from pneumonia_kedro.submission import SubmissionError

    out = tmp_path / "out"
    run_pipeline(mixed, out, SR_ON)
    before = _snapshot(out)
    assert len([name for name in before if name.startswith("structured_reports/")]) == 3
    other_test_set = pd.DataFrame({"patientId": ["first", "someone-else"]})
    with pytest.raises(SubmissionError, match="differ from the sample submission"):
        run_pipeline(mixed, out, {**SR_ON, "no_box": "whole_image"}, sample=other_test_set)
    assert _snapshot(out) == before  # nothing written aside, nothing replaced


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


def test_default_gate_skips_what_the_model_was_not_trained_for(incoming, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="pneumonia_kedro"):
        *_, predictions, submission, report = run_inference(incoming, tmp_path, PARAMS)
    assert sorted(report["skipped"]["first"]) == ["corrupt", "narrow"]
    # The gate's skip is not counted as a file that could not be decoded (it was).
    assert (report["undecodable"], report["skipped_by_quality_gate"]) == (1, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                and r.name == "pneumonia_kedro.pipelines.inference.nodes"]
    assert "1 file(s) could not be decoded; listed in inference_report.json" in warnings[0]
    assert warnings[1].startswith("1 file(s) were left out by the input quality gate "
                                  "(settings: quality.policies, inference)")
    assert report["skipped"]["first"]["narrow"] == (
        f"{incoming / 'narrow.dcm'}: quality gate modality: Modality NM: the model knows chest "
        "radiographs (CR, DX); quality gate not_chest: BodyPartExamined is WHOLE BODY, not "
        "the chest")
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
    build(plan_test_cache(dicoms, member, PARAMS, LENIENT["quality"], None),
          tmp_path / "cache")
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


def _member(seed: int) -> tuple:
    """An untrained tiny detector and classifier; another seed stands for a retraining."""
    import torch

    from pneumonia_kedro.classifier import TrainedClassifier, build_classifier

    torch.manual_seed(seed)
    return (TrainedModel(config=TINY_MODEL, state_dict=build_model(TINY_MODEL).state_dict(),
                         info={}),
            TrainedClassifier("resnet18", 32, build_classifier("resnet18").state_dict(), {}))


def _tuned(ensemble: Ensemble) -> dict:
    """The evaluate pipeline's post-processing for ``ensemble``, tuned on given predictions."""
    from pneumonia_kedro.pipelines.evaluate.nodes import tune_postprocessing

    truth = pd.DataFrame({"patientId": ["a", "b"], "Target": [1, 0],
                          "boxes": [[[100.0, 100.0, 200.0, 200.0]], []],
                          "view_position": ["AP", "PA"],
                          "detailed_class": ["Lung Opacity", "Normal"]})
    predictions = pd.DataFrame({"patientId": ["a", "b"], "x": [100.0, 10.0],
                                "y": [100.0, 10.0], "width": [100.0, 50.0],
                                "height": [100.0, 50.0], "score": [0.9, 0.3]})
    probabilities = pd.DataFrame({"patientId": ["a", "b"], "probability": [0.8, 0.2]})
    return tune_postprocessing(ensemble, predictions, truth, probabilities,
                               {"progress": False})[0]


@pytest.fixture(scope="module")
def small_test_set(tmp_path_factory) -> tuple[DicomFolder, ImageCache]:
    from pneumonia_kedro.imagecache import CacheConfig, plan

    folder = tmp_path_factory.mktemp("small")
    write_demo_dicoms(folder / "dicoms", n_positive=1, n_negative=1, seed=4)
    dicoms = DicomFolder.scan(str(folder / "dicoms"))
    config = CacheConfig(image_size=TINY_MODEL.image_size, workers=0, progress=False)
    build(plan(dicoms, dicoms.patient_ids, config), folder / "cache")
    return dicoms, ImageCache(folder / "cache")


def test_post_processing_tuned_for_other_models_is_refused_saying_what_to_run(
        small_test_set):
    """After `--pipelines train` retrained (or `--load-versions` picked another model), the
    new model was paired with the old post-processing in silence."""
    from pneumonia_kedro.config import ConfigError

    _, cache = small_test_set
    detector, classifier = _member(0)
    tuned_on = Ensemble.of(detector, classifier)
    postprocessing = _tuned(tuned_on)
    assert postprocessing["models"] == tuned_on.record()
    retrained = Ensemble.of(*_member(1))
    with pytest.raises(ConfigError) as caught:
        predict_test(retrained, cache, postprocessing, PARAMS)
    message = str(caught.value)
    assert message.startswith(
        "postprocessing.json was not tuned for the models inference would use "
        f"({retrained.version}): model's detector is {retrained.version}, it was tuned for "
        f"{tuned_on.version}; model's classifier is {retrained.classifiers[0].version}, it "
        f"was tuned for {classifier.version}. Tune it for them with `kedro run --pipelines "
        "evaluate`")
    assert "--load-versions trained_model:<version>,trained_classifier:<version>" in message
    # The classifier alone retrained (`--pipelines classify`): its gating was tuned too.
    with pytest.raises(ConfigError, match=r": model's classifier is resnet18-\w+, it was "
                                          r"tuned for resnet18-\w+\. Tune"):
        predict_test(Ensemble.of(detector, _member(1)[1]), cache, postprocessing, PARAMS)
    # A post-processing that names no models (an older run's) cannot be trusted either.
    untied = {k: v for k, v in postprocessing.items() if k != "models"}
    with pytest.raises(ConfigError, match=r"\): it names no models \(written before"):
        predict_test(tuned_on, cache, untied, PARAMS)
    assert predict_test(tuned_on, cache, postprocessing, PARAMS)["patientId"].notna().all()


def test_one_fold_of_the_tuned_ensemble_is_accepted_another_fold_set_refused(
        small_test_set):
    from pneumonia_kedro.config import ConfigError

    _, cache = small_test_set
    fold_0, fold_1 = _member(0), _member(1)
    postprocessing = _tuned(Ensemble.of(*fold_0, *fold_1))
    folds = Ensemble.of(*fold_0, *fold_1)
    chosen = predict_test(folds, cache, postprocessing, {**PARAMS, "models": "fold_1"})
    pd.testing.assert_frame_equal(
        chosen, predict_test(folds.select("fold_1"), cache, postprocessing, PARAMS))
    with pytest.raises(ConfigError, match=r"model is not among its models \(fold_0, fold_1\)"):
        predict_test(Ensemble.of(*fold_0), cache, postprocessing, PARAMS)
    with pytest.raises(ConfigError, match=r"fold_1's detector is mobilenet_v3_large_fpn-\w+, "
                                          r"it was tuned for mobilenet_v3_large_fpn-\w+;"):
        predict_test(Ensemble.of(*fold_0, *_member(2)), cache, postprocessing, PARAMS)


@pytest.mark.slow  # trains or builds several networks: outside the quick loop
def test_the_report_and_the_mlflow_run_name_the_models_that_predicted(small_test_set):
    import mlflow

    dicoms, cache = small_test_set
    ensemble = Ensemble.of(*_member(0))
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # this test's own store
    with mlflow.start_run() as run:
        predictions = predict_test(ensemble, cache, _tuned(ensemble), PARAMS)
    _, report, _ = write_submission(predictions, cache, dicoms, pd.DataFrame(), {}, PARAMS,
                                    ensemble)
    record = ensemble.record()
    assert report["models"] == {**record, "source": "catalog"}
    assert record["members"]["model"]["detector"] == ensemble.version
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["models.version"] == ensemble.version
    assert tags["models.model.classifier"] == ensemble.classifiers[0].version
