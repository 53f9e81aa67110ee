"""The whole demo run in real KedroSessions: every pipeline, MLflow, the served model."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from PIL import Image

from pneumonia_kedro.ensemble import Ensemble
from pneumonia_kedro.ui import free_port
from tests.conftest import run_session, tiny_demo_project, use_run
from tests.submission_format import parse_prediction_string
from tests.test_dicom_quality import PARAMS as QUALITY

# Real Kedro sessions, servers or subprocesses: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

SIZE = 64
TINY_RUN = {
    "split": {"n_per_class": None, "validation_fraction": 0.25, "stratify_by_view": False,
              "seed": 1},
    "cache": {"image_size": SIZE, "workers": 0, "progress": False},
    # The demo's detector (a ResNet-18 FPN, five maps), tiny: anchors given for the 64 px cache.
    "model": {"image_size": SIZE, "anchor_sizes": [[8], [12], [16], [32], [48]],
              "anchor_reference_size": None,
              "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
              "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
              "box_batch_size_per_image": 16, "box_head_size": 32,
              # every box reaches the post-processing, however low two epochs leave its score
              "box_score_thresh": 0.0, "box_detections_per_img": 5},
    "train": {"epochs": 2, "batch_size": 4, "validation_batch_size": 4,
              "warmup_iterations": 1, "progress": False},
    "classifier": {"architecture": "resnet18", "pretrained": "none", "image_size": 32,
                   "epochs": 2, "batch_size": 8, "progress": False},
    # TTA and gating on, so the served model is checked against the pipeline with them
    "evaluate": {"batch_size": 4, "progress": False,
                 "tta": {"hflip": True, "scales": [1.0, 1.25]},
                 "search": {"gating_rule": ["product"]}},
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """demo_data, then the default pipeline, once for this module's tests."""
    with pytest.MonkeyPatch.context() as patch:
        project = tiny_demo_project(tmp_path_factory.mktemp("full_run"), patch)
        test_ids = sorted(p.stem for p in
                          (project / "data/01_raw/rsna-demo/stage_2_test_images").iterdir())
        params = {**TINY_RUN, "inference": {"batch_size": 4, "progress": False,
                                            "cache": {"workers": 0, "progress": False},
                                            "overlay_patients": test_ids[:1]}}
        run_session(project, params=params)
    return {"project": project, "test_ids": test_ids,
            "tracking_uri": f"sqlite:///{project / 'mlflow.db'}"}


@pytest.fixture
def kedro_project(demo_run, monkeypatch) -> Path:
    """This module's tests all look at the one demo run's project and MLflow store."""
    return use_run(demo_run, monkeypatch)



def _model_run() -> pd.Series:
    """The latest run that logged a model (runs refused or failed by other tests log none)."""
    runs = mlflow.search_runs(experiment_names=["pneumonia-kedro"])
    return runs.loc[runs["tags.model_uri"].notna()].sort_values("start_time").iloc[-1]

def test_whole_pipeline_on_demo_data(demo_run, kedro_project: Path):
    data = kedro_project / "data"
    # Kaggle submission: one row per test file, stable order, parseable strings.
    submission = pd.read_csv(data / "07_model_output/demo/submission.csv",
                             keep_default_na=False)
    assert submission["patientId"].tolist() == demo_run["test_ids"]
    predictions = pd.read_parquet(data / "07_model_output/demo/test_predictions.parquet")
    for row in submission.to_dict("records"):
        boxes, scores = parse_prediction_string(row["PredictionString"])
        expected = predictions.loc[predictions["patientId"] == row["patientId"]]
        expected = expected.sort_values("score", ascending=False)
        np.testing.assert_allclose(scores, expected["score"], atol=5e-5)
        np.testing.assert_allclose(boxes, expected[["x", "y", "width", "height"]], atol=0.05)
        assert (boxes[:, 0] >= -0.05).all() and (boxes[:, 0] + boxes[:, 2] <= 1024.05).all()
    report = json.loads((data / "08_reporting/demo/inference_report.json").read_text())
    assert report["predicted"] == 3 and report["checked_against_sample"] is True
    assert (data / f"08_reporting/demo/overlays/{demo_run['test_ids'][0]}.png").stat().st_size

    # Evaluation outputs, figures and the report.
    metrics = json.loads((data / "08_reporting/demo/evaluation_metrics.json").read_text())
    assert 0.0 <= metrics["overall"]["competition_metric"] <= 1.0
    assert set(metrics["by_view_position"]) <= {"AP", "PA"}
    # Bootstrap intervals over patients, overall and in every breakdown (sex, age from headers).
    assert {"by_patient_sex", "by_age_band", "by_detailed_class"} <= set(metrics)
    for values in [metrics["overall"], *metrics["by_age_band"].values()]:
        for interval in values["intervals"].values():
            if not np.isnan(interval["low"]):
                assert interval["low"] <= interval["value"] <= interval["high"]
    for figure in (data / "08_reporting/demo/figures").glob("*.png"):
        with Image.open(figure) as image:
            assert image.size[0] > 100 and image.getextrema() != ((255, 255),) * 4
    assert len(list((data / "08_reporting/demo/figures").glob("*.png"))) >= 5
    report_text = (data / "08_reporting/demo/evaluation_report.md").read_text()
    assert "competition metric" in report_text and "figures/froc_curve.png" in report_text
    assert "95 % interval" in report_text and "## By age band" in report_text


def test_mlflow_run_holds_params_curves_tags_and_a_servable_model(demo_run,
                                                                   kedro_project: Path):
    runs = mlflow.search_runs(experiment_names=["pneumonia-kedro"])
    run = runs.sort_values("start_time").iloc[-1]
    assert run["status"] == "FINISHED"
    assert run["params.model.architecture"] == "resnet18_fpn"  # the demo's detector
    assert run["params.train.epochs"] == "2" and run["params.cache.image_size"] == str(SIZE)
    assert run["tags.git_commit"] and run["tags.torch_version"]
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(run["run_id"], "validation_competition_metric")
    assert sorted(m.step for m in curve) == [1, 2]
    assert "metrics.validation.competition_metric" in run
    assert run["metrics.validation.competition_metric_ci_low"] <= \
        run["metrics.validation.competition_metric"] <= \
        run["metrics.validation.competition_metric_ci_high"]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"figures", "submission.csv", "evaluation_report.md"} <= artifacts

    model_uri = run["tags.model_uri"]
    # Requirements pinned to what is installed here, not to versions written in the code.
    from importlib import metadata

    from pneumonia_kedro.model_package import SERVING_DISTRIBUTIONS

    requirements = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text()
    for name in SERVING_DISTRIBUTIONS:
        assert f"{name}=={metadata.version(name).split('+')[0]}" in requirements.splitlines()
    model = mlflow.pyfunc.load_model(model_uri)
    folder = kedro_project / "data/01_raw/rsna-demo/stage_2_test_images"
    ids = demo_run["test_ids"][:2]
    request = pd.DataFrame({
        "patientId": ids,
        "dicom": [base64.b64encode((folder / f"{pid}.dcm").read_bytes()).decode()
                  for pid in ids],
    })
    answer = model.predict(request)
    submission = pd.read_csv(kedro_project / "data/07_model_output/demo/submission.csv",
                             keep_default_na=False).set_index("patientId")
    for row in answer.to_dict("records"):
        served, _ = parse_prediction_string(row["PredictionString"])
        piped, _ = parse_prediction_string(submission.loc[row["patientId"],
                                                          "PredictionString"])
        np.testing.assert_allclose(served, piped, atol=0.06)


def test_trained_model_reloads_from_the_catalog_with_equal_predictions(demo_run,
                                                                       kedro_project: Path):
    import torch

    from pneumonia_kedro.inference import cached_squares
    from pneumonia_kedro.prediction import predict, prediction_settings

    with KedroSession.create(project_path=kedro_project, env="demo") as session:
        catalog = session.load_context().catalog
        trained = catalog.load("trained_model")
        cache = catalog.load("validation_image_cache")
    raw = pd.read_parquet(kedro_project / "data/07_model_output/demo/"
                          "raw_validation_predictions.parquet")
    # Made with the TTA that postprocessing.json records (hflip and two scales here).
    tta, _ = prediction_settings(catalog.load("postprocessing"))
    assert tta.hflip and tta.scales == (1.0, 1.25)
    # Kept per variant (four: two scales x mirror), for the search to fuse at any IoU.
    assert set(raw["variants"]) == {4}
    again = predict(Ensemble.of(trained, None).build(torch.device("cpu")),
                    cached_squares(cache), tta).variants
    pd.testing.assert_frame_equal(raw.reset_index(drop=True), again.reset_index(drop=True),
                                  check_dtype=False)


def _monochrome1_16bit(source: Path, target: Path) -> None:
    """The same chest as a 12-bit MONOCHROME1 uncompressed file (as other hospitals send)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array.astype(np.uint16)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = ((255 - pixels) * 16).tobytes()
    ds["PixelData"].VR = "OW"
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod"):
        delattr(ds, keyword)
    ds.save_as(target, enforce_file_format=True)


def test_served_model_answers_like_the_pipeline_and_rejects_bad_requests(
        demo_run, kedro_project: Path, tmp_path: Path):
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from pneumonia_kedro.dicom import DicomFolder
    from pneumonia_kedro.imagecache import build
    from pneumonia_kedro.pipelines.inference.nodes import (
        plan_test_cache,
        predict_test,
        write_submission,
    )

    # Two files: a competition file and a 12-bit MONOCHROME1 copy of another.
    source = kedro_project / "data/01_raw/rsna-demo/stage_2_test_images"
    folder = tmp_path / "incoming"
    folder.mkdir()
    first, second = demo_run["test_ids"][:2]
    (folder / f"{first}.dcm").write_bytes((source / f"{first}.dcm").read_bytes())
    _monochrome1_16bit(source / f"{second}.dcm", folder / f"{second}.dcm")

    # The pipeline's answer for them, through the inference pipeline's own nodes.
    with KedroSession.create(project_path=kedro_project, env="demo") as session:
        catalog = session.load_context().catalog
        trained = catalog.load("trained_model")
        classifier = catalog.load("trained_classifier")
        postprocessing = catalog.load("postprocessing")
    assert postprocessing["gating"]["rule"] == "product" and postprocessing["tta"]["hflip"]
    params = {"cache": {"workers": 0, "progress": False}, "progress": False}
    dicoms = DicomFolder.scan(str(folder))
    ensemble = Ensemble.of(trained, classifier)
    build(plan_test_cache(dicoms, ensemble, params, QUALITY, None), tmp_path / "cache")
    from pneumonia_kedro.imagecache import ImageCache

    cache = ImageCache(tmp_path / "cache")
    predictions = predict_test(ensemble, cache, postprocessing, params)
    expected, _, _ = write_submission(predictions, cache, dicoms, pd.DataFrame(), {},
                                      params)

    run = _model_run()
    port = free_port()
    bin_folder = str(Path(sys.executable).parent)  # mlflow starts uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": demo_run["tracking_uri"],
           "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
         run["tags.model_uri"], "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def post(rows: list[list[str]]) -> tuple[int, dict]:
        body = json.dumps({"dataframe_split": {"columns": ["patientId", "dicom"],
                                               "data": rows}}).encode()
        request = urllib.request.Request(f"{url}/invocations", body,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("model server did not start: "
                                         + server.stderr.read().decode()[-2000:]) from None
                time.sleep(1)
        rows = [[pid, base64.b64encode((folder / f"{pid}.dcm").read_bytes()).decode()]
                for pid in (first, second)]
        status, answer = post(rows)
        assert status == 200
        served = pd.DataFrame(answer["predictions"]).set_index("patientId")
        for row in expected.to_dict("records"):
            got, _ = parse_prediction_string(served.loc[row["patientId"], "PredictionString"])
            want, _ = parse_prediction_string(row["PredictionString"])
            np.testing.assert_allclose(got, want, atol=0.06)
        # The classifier's probabilities, gating the boxes above, are the pipeline's too.
        import torch

        from pneumonia_kedro.classifier import predict_probabilities

        piped_p = predict_probabilities(classifier, cache, torch.device("cpu"), hflip=True)
        np.testing.assert_allclose(served.loc[piped_p.index, "classifier_probability"],
                                   piped_p, atol=1e-5)

        status, error = post([["junk", base64.b64encode(b"not a dicom at all").decode()]])
        assert status == 400 and "not a DICOM file" in error["message"]
        status, error = post(rows * 40)  # 80 files: over max_files_per_request
        assert status == 400 and "at most 64" in error["message"]
        assert post(rows)[0] == 200  # still serving
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_inference_can_use_the_mlflow_model_instead_of_the_catalog(demo_run,
                                                                   kedro_project: Path,
                                                                   tmp_path: Path):
    from pneumonia_kedro.dicom import DicomFolder
    from pneumonia_kedro.imagecache import ImageCache, build
    from pneumonia_kedro.models import TrainedModel, build_model
    from pneumonia_kedro.pipelines.inference.nodes import (
        plan_test_cache,
        predict_test,
        write_submission,
    )

    run = _model_run()
    params = {"cache": {"workers": 0, "progress": False}, "progress": False,
              "model_uri": run["tags.model_uri"]}
    with KedroSession.create(project_path=kedro_project, env="demo") as session:
        catalog_model = session.load_context().catalog.load("trained_model")
    # A different catalog model proves the MLflow one is used.
    other = Ensemble.of(TrainedModel(config=catalog_model.config,
                                     state_dict=build_model(catalog_model.config).state_dict(),
                                     info={}), None)
    dicoms = DicomFolder.scan(str(kedro_project / "data/01_raw/rsna-demo/stage_2_test_images"))
    build(plan_test_cache(dicoms, other, params, QUALITY, None), tmp_path / "cache")
    cache = ImageCache(tmp_path / "cache")
    # Neither the catalog's classifier (None here) nor its post-processing is used either.
    predictions = predict_test(other, cache, {"score_threshold": 1.1}, params)
    submission, _, _ = write_submission(predictions, cache, dicoms, pd.DataFrame(), {},
                                        params)
    expected = pd.read_csv(kedro_project / "data/07_model_output/demo/submission.csv",
                           keep_default_na=False)
    pd.testing.assert_frame_equal(submission.reset_index(drop=True), expected)


def test_exploration_notebook_runs_against_the_demo_outputs(demo_run, kedro_project: Path):
    import nbformat
    from nbclient import NotebookClient

    from tests.conftest import PROJECT_ROOT

    notebook = nbformat.read(PROJECT_ROOT / "notebooks/exploration.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(kedro_project)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code"
               for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "competition metric" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)


def _with_header(data: bytes, **values: str) -> bytes:
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_served_model_answers_per_row_with_gate_flags_and_reports(demo_run,
                                                                   kedro_project: Path):
    from tests.test_inference import check_report_against_submission

    model = mlflow.pyfunc.load_model(_model_run()["tags.model_uri"])
    from pneumonia_kedro.dicom import decode
    from pneumonia_kedro.postprocess import GatingConfig
    from tests.dicom_files import native_dicom

    # Every box the tiny detector finds (its tuned threshold and gate may keep none of them
    # after two epochs): the boxes below are compared, not the training's luck.
    served = model.unwrap_python_model()
    served.postprocess = dataclasses.replace(served.postprocess, score_threshold=0.0,
                                             gating=GatingConfig())
    folder = kedro_project / "data/01_raw/rsna-demo/stage_2_test_images"
    first = (folder / f"{demo_run['test_ids'][0]}.dcm").read_bytes()
    # The same picture at half the size: the boxes, in its own pixels, differ.
    second = native_dicom(decode(first, "first").pixels[::2, ::2])
    alone = [model.predict(pd.DataFrame({"dicom": [data]})).iloc[0]
             for data in (first, second)]
    assert alone[0]["PredictionString"] and alone[1]["PredictionString"]
    assert alone[0]["PredictionString"] != alone[1]["PredictionString"]

    # Two images under one patientId are two answers, each its own image's.
    lateral = _with_header(first, ViewPosition="LL")
    answer = model.predict(pd.DataFrame({"patientId": ["same", "same", "lat"],
                                         "dicom": [first, second, lateral]}))
    assert answer["patientId"].tolist() == ["same", "same", "lat"]
    for row, expected in zip(answer.to_dict("records")[:2], alone, strict=True):
        assert row["PredictionString"] == expected["PredictionString"]
        assert row["image_probability"] == expected["image_probability"]
        assert row["skip_reason"] == "" and row["quality_flags"] == ""
    assert answer.iloc[2]["PredictionString"] == ""
    assert np.isnan(answer.iloc[2]["image_probability"])
    assert answer.iloc[2]["skip_reason"] == ("lat: quality gate lateral_view: ViewPosition "
                                             "LL: the model knows AP and PA")

    # Reports on request: the same boxes, in the source's pixels.
    assert "dicom_sr" not in answer
    served.dicom_sr = True
    with_reports = model.predict(pd.DataFrame({"dicom": [first, lateral]}))
    check_report_against_submission(base64.b64decode(with_reports.iloc[0]["dicom_sr"]), first,
                                    with_reports.iloc[0]["PredictionString"])
    assert with_reports.iloc[1]["dicom_sr"] == ""  # skipped: nothing to report


def test_structured_reports_are_off_by_default_and_written_on_request(demo_run,
                                                                      kedro_project: Path):
    """Runs the inference pipeline again: keep this test last in the module."""
    from tests.test_inference import check_report_against_submission

    data = kedro_project / "data"
    reports = data / "07_model_output/demo/structured_reports"
    assert not list(reports.glob("*.dcm"))  # the default run wrote none
    params = {**TINY_RUN, "inference": {"batch_size": 4, "progress": False, "dicom_sr": True,
                                        "cache": {"workers": 0, "progress": False}}}
    run_session(kedro_project, pipelines=["inference"], params=params)
    written = sorted(p.stem for p in reports.glob("*.dcm"))
    assert written == demo_run["test_ids"]
    submission = pd.read_csv(data / "07_model_output/demo/submission.csv",
                             keep_default_na=False).set_index("patientId")
    source = data / "01_raw/rsna-demo/stage_2_test_images"
    for patient_id in written:
        check_report_against_submission((reports / f"{patient_id}.dcm").read_bytes(),
                                        (source / f"{patient_id}.dcm").read_bytes(),
                                        submission.loc[patient_id, "PredictionString"])
    run = mlflow.search_runs(experiment_names=["pneumonia-kedro"]).sort_values(
        "start_time").iloc[-1]
    # Not in MLflow: an SR identifies the patient, and the artefact store is shared widely.
    logged = [a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"])]
    assert logged and not [path for path in logged if "structured_reports" in path]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("pipelines", "params", "key"), [
    (["cache", "train"], {"cache": {"image_size": -1}}, "params:cache.image_size = -1"),
    (["cache", "train"], {"train": {"epochs": 0}}, "params:train.epochs = 0"),
    (["cache", "train"], {"train": {"batch_size": 0}}, "params:train.batch_size = 0"),
    # Settings that used to be replaced in silence now say so.
    (["cache", "train"], {"model": {"image_size": 32}},
     "params:model.image_size = 32 differs from the image cache's 64 px"),
    (["inference"], {"inference": {"cache": {"image_size": 32}}},
     "params:inference.cache.image_size = 32 differs from the model's 64 px"),
    (["evaluate"], {"evaluate": {"postprocess": {"score_threshold": 0.3}}},
     "params:evaluate.postprocess is tuned as one search now"),
])
def test_bad_parameters_stop_before_anything_is_removed_or_published(demo_run,
                                                                    kedro_project: Path,
                                                                    pipelines, params, key):
    """A cache of real data is ~26,000 decoded DICOMs, and the newest model version is what
    evaluation and inference load: a bad number must leave both as they were."""
    from pneumonia_kedro.config import ConfigError

    data = kedro_project / "data"
    cache, models = data / "04_feature/demo/image_cache", data / "06_models/demo"
    history = data / "08_reporting/demo/training_history.csv"
    before = (_snapshot(cache), _snapshot(models), history.read_bytes())
    with pytest.raises(Exception) as info:  # Kedro wraps it in its own types
        run_session(kedro_project, pipelines=pipelines,
                    params={**TINY_RUN, **{k: {**TINY_RUN.get(k, {}), **v}
                                           for k, v in params.items()}})
    cause = info.value
    while cause.__cause__ is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    assert isinstance(cause, ConfigError) and key in str(cause)
    assert (_snapshot(cache), _snapshot(models), history.read_bytes()) == before
