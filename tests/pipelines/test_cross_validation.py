"""k-fold cross-validation through real Kedro sessions: the fold namespaces, out-of-fold
predictions, nested MLflow runs, one fold alone, folds side by side, and the served fold
ensemble."""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kedro.framework.project import configure_project
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.runner import ThreadRunner

from pneumonia_kedro.config import ConfigError
from tests.conftest import DEMO_RAW, run_session, tiny_demo_project, use_run
from tests.pipelines.test_full_run import TINY_RUN
from tests.submission_format import parse_prediction_string

# Real Kedro sessions: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

# Two folds are asked for as `FOLDS=2 kedro run` asks (the pipeline registry reads FOLDS).
CV_PARAMS = {**TINY_RUN, "inference": {"batch_size": 4, "progress": False,
                                       "cache": {"workers": 0, "progress": False}}}


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory) -> dict:
    """demo_data, then the default pipeline with FOLDS=2, once for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FOLDS", "2")
        project = tiny_demo_project(tmp_path_factory.mktemp("cross_validation"), patch)
        run_session(project, params=CV_PARAMS)
    yield {"project": project, "tracking_uri": f"sqlite:///{project / 'mlflow.db'}"}
    configure_project("pneumonia_kedro")  # registered anew without FOLDS


@pytest.fixture
def project(cv_run, monkeypatch) -> Path:
    monkeypatch.setenv("FOLDS", "2")
    project = use_run(cv_run, monkeypatch)
    bootstrap_project(project)  # the pipelines of 2 folds, whatever ran before
    return project


def _catalog(project: Path):
    with KedroSession.create(project_path=project, env="demo") as session:
        return session.load_context().catalog


def _runs() -> pd.DataFrame:
    return mlflow.search_runs(experiment_names=["pneumonia-kedro"]).sort_values("start_time")


def test_every_fold_namespace_has_its_datasets_and_every_patient_is_predicted_out_of_fold(
        project: Path):
    catalog = _catalog(project)
    train = catalog.load("train_patients")
    folds = catalog.load("patient_folds")
    assert sorted(folds["patientId"]) == sorted(train["patientId"])
    assert sorted(folds["fold"].unique()) == [0, 1]
    for index in (0, 1):
        fold = f"fold_{index}"
        for name in ("trained_model", "trained_classifier"):
            assert catalog.exists(f"{fold}.{name}"), f"{fold}.{name}"
        own = catalog.load(f"{fold}.validation_patients")["patientId"]
        assert sorted(own) == sorted(folds.loc[folds["fold"] == index, "patientId"])
        others = catalog.load(f"{fold}.train_patients")["patientId"]
        assert not set(own) & set(others) and len(own) + len(others) == len(train)
        assert (project / f"data/08_reporting/demo/folds/{fold}/training_history.csv").is_file()
    # Out of fold: every training patient once, by the model that never saw it.
    probabilities = catalog.load("out_of_fold_image_probabilities")
    assert sorted(probabilities["patientId"]) == sorted(train["patientId"])
    raw = catalog.load("raw_out_of_fold_predictions")
    assert set(raw["patientId"]) <= set(train["patientId"]) and len(raw)

    metrics = catalog.load("evaluation_metrics")
    assert metrics["cross_validation"]["folds"] == 2
    assert metrics["overall"]["images"] == len(train)  # out of fold leads
    validation = catalog.load("validation_patients")
    assert metrics["validation_ensemble"]["overall"]["images"] == len(validation)
    assert set(metrics["by_fold"]) == {"0", "1"}
    report = (project / "data/08_reporting/demo/evaluation_report.md").read_text()
    assert "Cross-validation: 2 folds" in report and "fold ensemble on the validation" in report
    history = catalog.load("training_history")
    assert sorted(history["fold"].unique()) == ["fold_0", "fold_1"]


def test_the_run_is_a_parent_mlflow_run_with_one_child_run_per_fold(project: Path):
    runs = _runs()
    parent = runs.loc[runs["tags.mlflow.runName"] == "__default__"].iloc[-1]
    assert parent["status"] == "FINISHED"
    assert np.isfinite(parent["metrics.out_of_fold.competition_metric"])
    assert np.isfinite(parent["metrics.validation.competition_metric"])  # the ensemble's
    assert parent["params.split.folds"] == "2"
    children = runs.loc[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert sorted(children["tags.mlflow.runName"]) == ["fold_0", "fold_1"]
    assert sorted(children["tags.fold"]) == ["fold_0", "fold_1"]
    client = mlflow.MlflowClient()
    for child in children.to_dict("records"):
        assert child["status"] == "FINISHED"
        assert child["params.train.epochs"] == "2"
        assert child["params.classifier.architecture"] == "resnet18"
        assert child["metrics.training.best_epoch"] in (1, 2)
        assert np.isfinite(child["metrics.training.best_validation_competition_metric"])
        assert child["metrics.classifier.best_epoch"] in (1, 2)
        # Each fold trained from scratch: none claims it resumed.
        assert pd.isna(child.get("metrics.training.resumed_after_epoch"))
        assert pd.isna(child.get("metrics.classifier.resumed_after_epoch"))
        curve = client.get_metric_history(child["run_id"], "validation_competition_metric")
        assert [m.step for m in curve] == [1, 2]
        curve = client.get_metric_history(child["run_id"], "classifier_validation_roc_auc")
        assert [m.step for m in curve] == [1, 2]
        assert {a.path for a in client.list_artifacts(child["run_id"])} == {
            "training_history.csv", "classifier_history.csv"}
    # The parent keeps the out-of-fold and ensemble results, not the folds' curves.
    assert not client.get_metric_history(parent["run_id"], "validation_competition_metric")


def test_the_served_fold_ensemble_answers_like_the_inference_pipeline(project: Path):
    runs = _runs()
    parent = runs.loc[runs["tags.mlflow.runName"] == "__default__"].iloc[-1]
    model = mlflow.pyfunc.load_model(parent["tags.model_uri"])
    detector = model.unwrap_python_model()
    assert len(detector.networks.detectors) == 2
    assert len(detector.networks.classifiers) == 2
    folder = project / DEMO_RAW / "stage_2_test_images"
    files = sorted(folder.glob("*.dcm"))
    request = pd.DataFrame({"patientId": [f.stem for f in files],
                            "dicom": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    served = model.predict(request).set_index("patientId")
    submission = pd.read_csv(project / "data/07_model_output/demo/submission.csv",
                             keep_default_na=False).set_index("patientId")
    assert sorted(served.index) == sorted(submission.index)
    for patient_id, row in submission.iterrows():
        got, got_scores = parse_prediction_string(served.loc[patient_id, "PredictionString"])
        want, want_scores = parse_prediction_string(row["PredictionString"])
        np.testing.assert_allclose(got, want, atol=0.06)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-3)


def test_one_fold_runs_alone_with_namespaces(project: Path):
    models = project / "data/06_models/demo/folds"
    before = {fold: sorted(p.name for p in (models / fold / "trained_model.pt").iterdir())
              for fold in ("fold_0", "fold_1")}
    run_session(project, pipelines=["cross_validation"], params=CV_PARAMS, namespaces=["fold_1"])
    after = {fold: sorted(p.name for p in (models / fold / "trained_model.pt").iterdir())
             for fold in ("fold_0", "fold_1")}
    assert after["fold_0"] == before["fold_0"]
    assert len(after["fold_1"]) == len(before["fold_1"]) + 1
    runs = _runs()
    run = runs.loc[runs["tags.mlflow.runName"] == "cross_validation"].iloc[-1]
    children = runs.loc[runs["tags.mlflow.parentRunId"] == run["run_id"]]
    assert children["tags.mlflow.runName"].tolist() == ["fold_1"]


def test_folds_train_side_by_side_with_the_thread_runner(project: Path):
    params = {**CV_PARAMS, "train": {**CV_PARAMS["train"], "epochs": 1},
              "classifier": {**CV_PARAMS["classifier"], "epochs": 1}}
    run_session(project, pipelines=["cross_validation"], params=params,
                runner=ThreadRunner(max_workers=2))
    runs = _runs()
    parent = runs.loc[runs["tags.mlflow.runName"] == "cross_validation"].iloc[-1]
    assert parent["status"] == "FINISHED"
    children = runs.loc[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert sorted(children["tags.mlflow.runName"]) == ["fold_0", "fold_1"]
    for child in children.to_dict("records"):
        assert child["status"] == "FINISHED" and child["params.train.epochs"] == "1"
        assert child["metrics.training.best_epoch"] == 1
        assert pd.isna(child.get("metrics.training.resumed_after_epoch"))


def test_inference_models_picks_one_fold_instead_of_the_ensemble(project: Path):
    from pneumonia_kedro.ensemble import Ensemble
    from pneumonia_kedro.pipelines.folds import member_datasets
    from pneumonia_kedro.pipelines.inference.nodes import predict_test

    catalog = _catalog(project)
    ensemble = Ensemble.of(*map(catalog.load, member_datasets(2)))
    cache = catalog.load("test_image_cache")
    postprocessing = {**catalog.load("postprocessing"), "score_threshold": 0.0}
    quiet = {"progress": False}
    both = predict_test(ensemble, cache, postprocessing, quiet)
    chosen = predict_test(ensemble, cache, postprocessing, {**quiet, "models": "fold_1"})
    alone = predict_test(ensemble.select("fold_1"), cache, postprocessing, quiet)
    pd.testing.assert_frame_equal(chosen, alone)
    assert not chosen[["x", "score"]].equals(both[["x", "score"]])
    with pytest.raises(ConfigError, match="inference.models = 'fold_5'"):
        predict_test(ensemble, cache, postprocessing, {**quiet, "models": "fold_5"})
