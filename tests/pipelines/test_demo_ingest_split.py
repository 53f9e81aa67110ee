"""demo_data, ingest and split run in a real KedroSession of a copy of the project."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.io import DatasetError

from pneumonia_kedro.errors import MissingDataError
from pneumonia_kedro.pipelines.demo_data import nodes as demo_data_nodes
from tests.conftest import PROJECT_ROOT, TINY_DEMO

# Real Kedro sessions, servers or subprocesses: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow


def test_one_run_generates_the_demo_data_and_ingests_it(run_kedro, kedro_project: Path):
    # It stopped with "Raw data for this run is missing": the check now sees that the run's
    # own demo_data pipeline writes the raw datasets that ingest reads (the same datasets).
    run_kedro(pipelines=["demo_data", "ingest", "split"], params={"demo_data": TINY_DEMO})
    assert len(pd.read_parquet(kedro_project / "data/03_primary/demo/patients.parquet")) == 16
    assert (kedro_project / "data/05_model_input/demo/train_patients.parquet").is_file()


def test_the_demo_generator_never_writes_outside_the_demo_environment(run_kedro,
                                                                     kedro_project: Path):
    with pytest.raises(DatasetError, match="raw data is read-only in this environment"):
        run_kedro(env="base", pipelines=["demo_data"], params={"demo_data": TINY_DEMO})
    raw = kedro_project / "data/01_raw/rsna-pneumonia-detection-challenge"
    assert not raw.exists() or not any(raw.rglob("*"))
    # The generation's manifest is declared in conf/demo only: elsewhere no node's output
    # can land in the raw folder (even `--nodes describe_demo_generation_node` keeps it in memory).
    for env, declared in (("base", False), ("demo", True)):
        with KedroSession.create(project_path=kedro_project, env=env) as session:
            assert ("demo_data_manifest" in session.load_context().catalog) == declared


def test_demo_data_then_ingest_and_split(run_kedro, kedro_project: Path):
    run_kedro(pipelines=["demo_data"], params={"demo_data": TINY_DEMO})
    raw = kedro_project / "data/01_raw/rsna-demo"
    assert sorted(p.name for p in raw.iterdir()) == [
        "demo_data.json", "stage_2_detailed_class_info.csv", "stage_2_sample_submission.csv",
        "stage_2_test_images", "stage_2_train_images", "stage_2_train_labels.csv"]
    assert len(list((raw / "stage_2_train_images").glob("*.dcm"))) == 16
    assert len(list((raw / "stage_2_test_images").glob("*.dcm"))) == 3
    labels = pd.read_csv(raw / "stage_2_train_labels.csv")
    class_info = pd.read_csv(raw / "stage_2_detailed_class_info.csv")
    assert list(labels.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    assert len(class_info) == len(labels)

    run_kedro(pipelines=["ingest", "split"])
    patients = pd.read_parquet(kedro_project / "data/03_primary/demo/patients.parquet")
    assert len(patients) == 16 and set(patients["view_position"]) <= {"AP", "PA"}
    train = pd.read_parquet(kedro_project / "data/05_model_input/demo/train_patients.parquet")
    validation = pd.read_parquet(
        kedro_project / "data/05_model_input/demo/validation_patients.parquet")
    assert not set(train["patientId"]) & set(validation["patientId"])
    assert len(train) + len(validation) == 16
    report = json.loads((kedro_project / "data/08_reporting/demo/ingest_report.json").read_text())
    assert report["patients"] == 16 and report["positive_patients"] == 8
    assert report["boxes"] == int(labels["Target"].sum())

    # Each kedro run is one MLflow run with its parameters logged flattened.
    runs = mlflow.search_runs(experiment_names=["pneumonia-kedro"])
    assert len(runs) == 2
    latest = runs.sort_values("start_time").iloc[-1]
    assert latest["params.split.seed"] == "42"
    assert latest["params.ingest.on_missing_image"] == "error"



def test_a_smaller_generation_leaves_no_earlier_patient_behind(run_kedro, kedro_project: Path):
    run_kedro(pipelines=["demo_data"], params={"demo_data": TINY_DEMO})
    run_kedro(pipelines=["demo_data"],
              params={"demo_data": {**TINY_DEMO, "n_positive": 3, "n_negative": 2, "n_test": 1}})
    raw = kedro_project / "data/01_raw/rsna-demo"
    labels = pd.read_csv(raw / "stage_2_train_labels.csv")
    images = sorted(p.stem for p in (raw / "stage_2_train_images").iterdir())
    assert images == sorted(labels["patientId"].unique()) and len(images) == 5
    assert len(list((raw / "stage_2_test_images").iterdir())) == 1
    assert sorted(p.name for p in raw.iterdir()) == [  # no staging folder left
        "demo_data.json", "stage_2_detailed_class_info.csv", "stage_2_sample_submission.csv",
        "stage_2_test_images", "stage_2_train_images", "stage_2_train_labels.csv"]


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_plans_a_new_generation_after_one_stopped_part_way(
        run_kedro, kedro_project: Path, monkeypatch: pytest.MonkeyPatch):
    shutil.copy(PROJECT_ROOT / "Makefile", kedro_project)

    def make_would_generate() -> bool:
        plan = subprocess.run(["make", "-n", "demo-data"], cwd=kedro_project, check=True,
                              capture_output=True, text=True).stdout
        return "--pipelines demo_data" in plan

    assert make_would_generate()  # nothing generated yet
    run_kedro(pipelines=["demo_data"], params={"demo_data": TINY_DEMO})
    raw = kedro_project / "data/01_raw/rsna-demo"
    manifest = json.loads((raw / "demo_data.json").read_text())
    assert (manifest["seed"], manifest["style"], manifest["train_patients"],
            manifest["train_images"], manifest["test_images"]) == (7, "classic", 16, 16, 3)
    assert not make_would_generate()
    (kedro_project / "conf/base/parameters_demo_data.yml").touch()  # settings edited
    assert make_would_generate()
    (raw / "demo_data.json").touch()

    # Ctrl-C while the second, larger generation renders its images: its label CSVs are
    # written, the image folder is still the first generation's.
    real_demo_file, rendered = demo_data_nodes.demo_file, []

    def interrupted(*args, **kwargs):
        if len(rendered) == 5:
            raise KeyboardInterrupt
        rendered.append(args[0])
        return real_demo_file(*args, **kwargs)

    monkeypatch.setattr(demo_data_nodes, "demo_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_kedro(pipelines=["demo_data"], params={"demo_data": {**TINY_DEMO, "n_positive": 12}})
    assert len(pd.read_csv(raw / "stage_2_train_labels.csv")["patientId"].unique()) == 20
    assert len(list((raw / "stage_2_train_images").glob("*.dcm"))) == 16
    with pytest.raises(MissingDataError, match="make demo-data` regenerates"):
        run_kedro(pipelines=["ingest"])
    assert make_would_generate()


def test_missing_image_stops_or_is_excluded(run_kedro, kedro_project: Path):
    run_kedro(pipelines=["demo_data"], params={"demo_data": TINY_DEMO})
    images = sorted((kedro_project / "data/01_raw/rsna-demo/stage_2_train_images").glob("*.dcm"))
    images[0].unlink()
    images[1].rename(images[1].with_suffix(".DCM"))  # near misses are named with the reason
    (images[0].parent / "unlabelled-1.dcm").write_bytes(images[2].read_bytes())
    with pytest.raises(MissingDataError, match=f"(?s)2 patient.*{images[0].stem}") as info:
        run_kedro(pipelines=["ingest"])
    assert f"{images[1].stem}.DCM: file name ends in '.DCM', not '.dcm'" in str(info.value)
    run_kedro(pipelines=["ingest"], params={"ingest": {"on_missing_image": "exclude"}})
    report = json.loads(
        (kedro_project / "data/08_reporting/demo/ingest_report.json").read_text())
    assert report["missing_images"] == {"count": 2,
                                        "first": sorted([images[0].stem, images[1].stem])}
    assert report["patients"] == 14
    assert report["unlabelled_dicoms"] == {"count": 1, "first": ["unlabelled-1"]}


def test_run_without_data_says_where_to_put_it(kedro_project: Path, run_kedro):
    with pytest.raises(MissingDataError, match="rsna-pneumonia-detection-challenge") as info:
        run_kedro(env="base", pipelines=["ingest"])
    assert "make demo" in str(info.value)
    assert not (kedro_project / "data").exists() or not any(
        (kedro_project / "data").rglob("*.parquet"))


def test_default_pipeline_excludes_demo_data(kedro_project: Path, run_kedro):
    from kedro.framework.project import pipelines

    assert "demo_data" in pipelines
    default_nodes = {node.name for node in pipelines["__default__"].nodes}
    assert "sample_demo_patients_node" not in default_nodes
    assert {"validate_labels_node", "split_patients_node"} <= default_nodes
    assert KedroSession is not None


def test_a_mistyped_environment_names_the_ones_that_exist(run_kedro, kedro_project):
    # Without --env the default run environment (conf/local) is checked, and exists.
    with KedroSession.create(project_path=kedro_project) as session:
        assert session.load_context().env is None
    with pytest.raises(MissingDataError, match="Kedro environment 'dmeo' does not exist") as info:
        run_kedro(env="dmeo", pipelines=["ingest"])
    assert "Environments here: demo, gpu, local" in str(info.value)
    assert "--env demo" in str(info.value)
