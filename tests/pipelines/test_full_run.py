"""The whole demo run in real KedroSessions: every pipeline, MLflow, the served model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from PIL import Image

from pneumonia_kedro.submission import parse_prediction_string
from tests.conftest import TINY_DEMO

SIZE = 64
TINY_RUN = {
    "split": {"n_per_class": None, "validation_fraction": 0.25, "stratify_by_view": False,
              "seed": 1},
    "cache": {"image_size": SIZE, "workers": 0, "progress": False},
    "model": {"image_size": SIZE, "anchor_sizes": [[8, 16, 32, 64]] * 3,
              "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
              "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
              "box_batch_size_per_image": 16, "box_head_size": 32,
              "box_detections_per_img": 5},
    "train": {"epochs": 2, "batch_size": 4, "validation_batch_size": 4,
              "warmup_iterations": 1, "progress": False},
    "evaluate": {"batch_size": 4, "progress": False},
}


@pytest.fixture
def demo_run(run_kedro, kedro_project: Path) -> dict:
    run_kedro(pipelines=["demo_data"], params={"demo_data": TINY_DEMO})
    test_ids = sorted(p.stem for p in
                      (kedro_project / "data/01_raw/rsna-demo/stage_2_test_images").iterdir())
    params = {**TINY_RUN, "inference": {"batch_size": 4, "progress": False,
                                        "cache": {"workers": 0, "progress": False},
                                        "overlay_patients": test_ids[:1]}}
    run_kedro(params=params)
    return {"test_ids": test_ids}


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
    for figure in (data / "08_reporting/demo/figures").glob("*.png"):
        with Image.open(figure) as image:
            assert image.size[0] > 100 and image.getextrema() != ((255, 255),) * 4
    assert len(list((data / "08_reporting/demo/figures").glob("*.png"))) >= 5
    report_text = (data / "08_reporting/demo/evaluation_report.md").read_text()
    assert "competition metric" in report_text and "figures/froc_curve.png" in report_text


def test_mlflow_run_holds_params_curves_tags_and_a_servable_model(demo_run,
                                                                   kedro_project: Path):
    runs = mlflow.search_runs(experiment_names=["pneumonia-kedro"])
    run = runs.sort_values("start_time").iloc[-1]
    assert run["status"] == "FINISHED"
    assert run["params.model.architecture"] == "mobilenet_v3_large_fpn"
    assert run["params.train.epochs"] == "2" and run["params.cache.image_size"] == str(SIZE)
    assert run["tags.git_commit"] and run["tags.torch_version"]
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(run["run_id"], "validation_competition_metric")
    assert sorted(m.step for m in curve) == [1, 2]
    assert "metrics.validation.competition_metric" in run
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"figures", "submission.csv", "evaluation_report.md"} <= artifacts

    model_uri = run["tags.model_uri"]
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

    from pneumonia_kedro.inference import predict_cache

    with KedroSession.create(project_path=kedro_project, env="demo") as session:
        catalog = session.load_context().catalog
        trained = catalog.load("trained_model")
        cache = catalog.load("validation_image_cache")
    raw = pd.read_parquet(kedro_project / "data/07_model_output/demo/"
                          "raw_validation_predictions.parquet")
    again = predict_cache(trained.build(), cache, torch.device("cpu"), progress=False)
    pd.testing.assert_frame_equal(raw.reset_index(drop=True), again.reset_index(drop=True),
                                  check_dtype=False)
