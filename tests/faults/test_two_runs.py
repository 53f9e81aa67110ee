"""Two full demo runs over DICOMs that carry identifying tags (names, birth dates, other IDs,
institution): the runs give identical results, and no identifying value reaches any output."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import pydicom
import pytest
import torch

from tests.conftest import DEMO_RAW, run_session, tiny_demo_project
from tests.orthanc import PASSWORD, USER, running_orthanc
from tests.pipelines.test_full_run import TINY_RUN

# Values the competition's files never hold; any of them in an output is a leak.
IDENTIFYING = {
    "PatientName": "Zyxwa^Quilliam^Marguerite",
    "PatientBirthDate": "19470312",
    "OtherPatientIDs": "MRN-5550193",
    "PatientAddress": "42 Wallaby Way, Quokkaville",
    "PatientTelephoneNumbers": "555-0199-7321",
    "InstitutionName": "Saint Vellichor Infirmary",
    "InstitutionAddress": "7 Orrery Lane, Brindlemoor",
    "ReferringPhysicianName": "Hobsbawm^Teodora",
    "AccessionNumber": "ACC80715523",
    "StudyID": "STU3318842",
}
# What a leak could look like after a library reformatted it.
NEEDLES = [*IDENTIFYING.values(), "Zyxwa", "Quilliam", "Marguerite", "1947-03-12", "Wallaby",
           "Vellichor", "Orrery", "Hobsbawm", "5550193", "80715523", "3318842"]


def add_identifying_tags(folder: Path) -> None:
    """Rewrite each DICOM with identifying values; the pixel data stays byte-identical."""
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTIFYING.items():
            setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer)
        path.write_bytes(buffer.getvalue())


def full_run(root: Path, raw: Path | None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default pipeline over the tiny demo data (generated once, then copied)."""
    project = tiny_demo_project(root, monkeypatch, raw)
    if raw is None:
        for images in ("stage_2_train_images", "stage_2_test_images"):
            add_identifying_tags(project / DEMO_RAW / images)
    params = {**TINY_RUN, "inference": {"batch_size": 4, "progress": False,
                                        "cache": {"workers": 0, "progress": False}}}
    run_session(project, params=params)
    return project


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    with pytest.MonkeyPatch.context() as patch:
        first = full_run(tmp_path_factory.mktemp("first"), None, patch)
        second = full_run(tmp_path_factory.mktemp("second"), first / DEMO_RAW, patch)
    return first, second


def latest_model(project: Path) -> dict:
    versions = project / "data/06_models/demo/trained_model.pt"
    path = sorted(versions.glob("*/trained_model.pt"))[-1]
    return torch.load(path, map_location="cpu", weights_only=True)


def run_metrics(project: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the project's MLflow run, with its steps; timings left out."""
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "pneumonia-kedro"]
    (run,) = client.search_runs([experiment.experiment_id],
                                "tags.mlflow.runName = '__default__'")
    timing = ("images_per_second", "data_wait_share", "seconds", "duration")
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                             key))
            for key in run.data.metrics if not any(word in key for word in timing)}


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_results(two_runs):
    first, second = two_runs
    data = "data/05_model_input/demo"
    for table in ("train_patients", "validation_patients"):
        pd.testing.assert_frame_equal(pd.read_parquet(first / data / f"{table}.parquet"),
                                      pd.read_parquet(second / data / f"{table}.parquet"))
    for cache in ("train", "validation", "test"):
        folder = f"data/04_feature/demo/image_cache/{cache}"
        assert (first / folder / "images.npy").read_bytes() == \
            (second / folder / "images.npy").read_bytes()
        pd.testing.assert_frame_equal(pd.read_parquet(first / folder / "index.parquet"),
                                      pd.read_parquet(second / folder / "index.parquet"))
    one, two = latest_model(first), latest_model(second)
    assert one["info"] == two["info"] and one["state_dict"].keys() == two["state_dict"].keys()
    for key, value in one["state_dict"].items():
        assert torch.equal(value, two["state_dict"][key]), key
    metrics = run_metrics(first)
    assert "validation_competition_metric" in metrics and len(metrics) > 10
    assert metrics == run_metrics(second)
    for output in ("08_reporting/demo/evaluation_metrics.json",
                   "07_model_output/demo/test_predictions.parquet",
                   "07_model_output/demo/submission.csv"):
        assert (first / "data" / output).read_bytes() == (second / "data" / output).read_bytes()


def strings_in(path: Path) -> list[str]:
    """The text a file could carry a value in: table cells as well as the raw bytes (a
    compressed Parquet page would hide a value from a byte search)."""
    texts = [path.read_bytes().decode("latin-1")]
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
        texts += [json.dumps(list(table.columns)), table.astype(str).to_csv()]
    return texts


def leaks(texts: list[str]) -> list[str]:
    # Lower-cased once per text: the model and the image caches run to megabytes each.
    lowered = [text.lower() for text in texts]
    return sorted({needle for needle in NEEDLES for text in lowered if needle.lower() in text})


@pytest.mark.slow
def test_no_identifying_value_reaches_any_output(two_runs):
    project, _ = two_runs
    raw = project / DEMO_RAW
    assert leaks(strings_in(sorted((raw / "stage_2_train_images").glob("*.dcm"))[0])), \
        "the inputs must carry the identifying values for this test to mean anything"
    assert not list(project.rglob("structured_reports/*.dcm")), "SR output must be off by default"
    assert not list(project.rglob("pacs_secondary_captures/*")), "deliver is not in the default"
    scanned = 0
    for path in sorted(project.rglob("*")):
        if path.is_file() and raw not in path.parents:
            assert leaks(strings_in(path)) == [], path
            scanned += 1
    assert scanned > 30 and (project / "mlflow.db").is_file()

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "pneumonia-kedro"]
    artifacts = 0
    for run in client.search_runs([experiment.experiment_id]):
        recorded = [json.dumps(run.data.params), json.dumps(run.data.tags),
                    json.dumps(run.data.metrics), str(run.info)]
        assert leaks(recorded) == [], run.info.run_id
        if not client.list_artifacts(run.info.run_id):
            continue
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, tracking_uri=f"sqlite:///{project / 'mlflow.db'}"))
        for path in (p for p in local.rglob("*") if p.is_file()):
            assert leaks(strings_in(path)) == [], path
            artifacts += 1
    assert artifacts > 10  # figures, reports, the model and its code


@pytest.fixture
def orthanc(tmp_path):
    yield from running_orthanc(tmp_path / "orthanc")


def new_run(client: mlflow.MlflowClient, before: set[str]) -> mlflow.entities.Run:
    (experiment,) = [e for e in client.search_experiments() if e.name == "pneumonia-kedro"]
    (run,) = [r for r in client.search_runs([experiment.experiment_id])
              if r.info.run_id not in before]
    return run


def mlflow_leaks(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> dict[str, list[str]]:
    """The identifying values in the run's params, tags, metrics and in each artefact
    (downloaded from the store), by where they were found."""
    found = {"record": leaks([json.dumps(run.data.params), json.dumps(run.data.tags),
                              json.dumps(run.data.metrics), str(run.info)])}
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                     tracking_uri=client.tracking_uri))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        found[str(path.relative_to(local))] = leaks(strings_in(path))
    return found


@pytest.mark.slow
def test_the_pacs_objects_are_the_one_output_that_identifies_the_patient(
        two_runs, orthanc, monkeypatch, caplog, capfd):
    """``kedro run --pipelines inference,deliver --params inference.dicom_sr=true`` into a real
    Orthanc: the SRs and overlays (on disk and in the PACS) carry the source's patient and
    study identification, so the PACS files them with the study; the delivery report, the
    logs, every other file and every MLflow record of the run carry none."""
    caplog.set_level(logging.INFO)
    _, project = two_runs
    monkeypatch.chdir(project)
    tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    for variable, value in (("PACS_DICOMWEB_URL", orthanc.dicomweb_url),
                            ("PACS_USERNAME", USER), ("PACS_PASSWORD", PASSWORD)):
        monkeypatch.setenv(variable, value)
    client = mlflow.MlflowClient(tracking_uri)
    before = {r.info.run_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    params = {**TINY_RUN, "inference": {"batch_size": 4, "progress": False, "dicom_sr": True,
                                        "cache": {"workers": 0, "progress": False}}}
    run_session(project, pipelines=["inference", "deliver"], params=params)

    output = project / "data/07_model_output/demo"
    reports = sorted((output / "structured_reports").glob("*.dcm"))
    overlays = sorted((output / "pacs_secondary_captures").glob("*.dcm"))
    assert len(reports) == 3 and [p.name for p in overlays] == [p.name for p in reports]
    delivered = 0
    for path in reports + overlays:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        (stored,) = orthanc.find("Instance", {"SOPInstanceUID": ds.SOPInstanceUID})
        in_pacs = pydicom.dcmread(io.BytesIO(orthanc.file(stored["ID"])),
                                  stop_before_pixels=True)
        for copy in (ds, in_pacs):
            assert str(copy.PatientName) == IDENTIFYING["PatientName"], path
            assert copy.PatientBirthDate == IDENTIFYING["PatientBirthDate"], path
            assert copy.AccessionNumber == IDENTIFYING["AccessionNumber"], path
        delivered += 1
    assert delivered == 6
    report = project / "data/08_reporting/demo/delivery_report.json"
    assert json.loads(report.read_text())["stored"] == 6 and leaks(strings_in(report)) == []
    # The logs, as captured and as printed: the delivery was logged, with no identification.
    console = capfd.readouterr()
    assert "6 stored now" in caplog.text and "6 stored now" in console.out
    assert leaks([caplog.text, console.out, console.err]) == []
    raw = project / DEMO_RAW
    for path in sorted(project.rglob("*")):  # info.log and the SQLite store included
        if path.is_file() and raw not in path.parents and \
                not {"structured_reports", "pacs_secondary_captures"} & set(path.parts):
            assert leaks(strings_in(path)) == [], path
    # MLflow: the run's record and every artefact. The SRs are not among them: the
    # artefact store is shared more widely than the PACS (they were logged, identity and all).
    run = new_run(client, before)
    assert run.data.params["deliver.protocol"] == "stow_rs"
    found = mlflow_leaks(client, run)
    assert not any(name.endswith(".dcm") for name in found), sorted(found)
    assert "submission.csv" in found and not any(found.values()), found
