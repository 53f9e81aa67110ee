"""Pipeline slices on an in-memory catalog with the SequentialRunner, as Kedro's spaceflights
starter tests them: the data flow between nodes, without a session, MLflow or files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.errors import LabelsError
from pneumonia_kedro.pipelines import evaluate, ingest, split
from tests.dicom_files import native_dicom

PATIENTS = [f"p{i}" for i in range(8)]
COPY = "p8"  # a byte copy of p0's file (PatientID p0 inside), labelled negative
BOXES = {"p0": [[100.0, 200.0, 150.0, 250.0], [600.0, 180.0, 160.0, 240.0]],
         "p1": [[120.0, 300.0, 200.0, 200.0]], "p2": [[640.0, 220.0, 180.0, 300.0]],
         "p3": [[90.0, 150.0, 210.0, 330.0]]}


def labels() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, classes = [], []
    for pid in [*PATIENTS, COPY]:
        boxes = BOXES.get(pid, [[np.nan] * 4])
        for box in boxes:
            rows.append([pid, *box, int(pid in BOXES)])
        classes += [[pid, "Lung Opacity" if pid in BOXES else "Normal"]] * len(boxes)
    return (pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"]),
            pd.DataFrame(classes, columns=["patientId", "class"]))


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory) -> DicomFolder:
    folder = tmp_path_factory.mktemp("dicoms")
    rng = np.random.default_rng(0)
    for number, pid in enumerate(PATIENTS):
        pixels = rng.integers(0, 256, size=(32, 32)).astype(np.uint8)
        (folder / f"{pid}.dcm").write_bytes(
            native_dicom(pixels, ViewPosition="AP" if number % 2 else "PA", PatientID=pid))
    (folder / f"{COPY}.dcm").write_bytes((folder / "p0.dcm").read_bytes())
    return DicomFolder.scan(str(folder))


def run(pipeline: Pipeline, **inputs: object) -> dict[str, object]:
    catalog = DataCatalog(datasets={name: MemoryDataset(value) for name, value in
                                    inputs.items()})
    outputs = SequentialRunner().run(pipeline, catalog)
    return {name: dataset.load() for name, dataset in outputs.items()}


def test_ingest_then_split_keeps_every_patient_whole(dicoms):
    train_labels, class_info = labels()
    pipeline = ingest.create_pipeline() + split.create_pipeline()
    out = run(pipeline, train_labels=train_labels, class_info=class_info, train_dicoms=dicoms,
              **{"params:ingest": {}, "params:split": {"n_per_class": None,
                                                       "validation_fraction": 0.5, "seed": 3}})
    train, validation = out["train_patients"], out["validation_patients"]
    assert sorted([*train["patientId"], *validation["patientId"]]) == [*PATIENTS, COPY]
    assert set(train["view_position"]) | set(validation["view_position"]) == {"AP", "PA"}
    both = pd.concat([train, validation]).set_index("patientId")
    assert both.loc["p0", "n_boxes"] == 2 and both.loc["p7", "n_boxes"] == 0
    report = out["ingest_report"]
    assert report["patients"] == 9 and out["split_report"]
    # The copied image is reported, with its disagreeing label and header, and stays with
    # its original in one split (they landed in different splits with opposite labels).
    assert report["duplicate_images"] == {"groups": 1, "patients": 2,
                                          "with_different_labels": 1,
                                          "first": [["p0", COPY]]}
    assert report["patient_id_mismatches"] == {"count": 1, "first": [COPY]}
    assert ("p0" in set(train["patientId"])) == (COPY in set(train["patientId"]))


def test_ingest_names_the_missing_column():
    train_labels, class_info = labels()
    with pytest.raises(LabelsError, match="Target"):
        run(ingest.create_pipeline().only_nodes("validate_labels_node"),
            train_labels=train_labels.drop(columns=["Target"]), class_info=class_info,
            **{"params:ingest": {}})


def test_threshold_tuning_then_evaluation_on_given_predictions():
    truth = pd.DataFrame({"patientId": ["a", "b", "c"], "Target": [1, 0, 1],
                          "boxes": [[[100.0, 100.0, 200.0, 200.0]], [], [[50.0, 60.0, 70, 80]]],
                          "view_position": ["AP", "PA", "AP"],
                          "detailed_class": ["Lung Opacity", "Normal", "Lung Opacity"]})
    # A good box on a (0.9), a false alarm on b (0.3), a good box on c (0.6).
    predictions = pd.DataFrame({"patientId": ["a", "b", "c"], "x": [100.0, 10.0, 50.0],
                                "y": [100.0, 10.0, 60.0], "width": [200.0, 50.0, 70.0],
                                "height": [200.0, 50.0, 80.0], "score": [0.9, 0.3, 0.6]})
    pipeline = evaluate.create_pipeline().from_nodes("tune_postprocessing_node") \
        .to_nodes("evaluate_node")
    # An uninformative classifier: no gating rule beats "none", which wins the ties.
    probabilities = pd.DataFrame({"patientId": ["a", "b", "c"], "probability": 0.5})
    out = run(pipeline, raw_validation_predictions=predictions, validation_patients=truth,
              validation_image_probabilities=probabilities,
              **{"params:evaluate": {"progress": False}})
    assert out["evaluation_metrics"]["postprocessing"]["gating"]["rule"] == "none"
    # Above 0.3 and up to 0.6 every image scores 1; the lowest such grid value is chosen.
    assert out["evaluation_metrics"]["postprocessing"]["score_threshold"] == pytest.approx(0.35)
    assert out["threshold_curve"]["competition_metric"].max() == 1.0
    # Reported held out from tuning: the half holding b was tuned on one positive alone
    # (threshold 0.05), so b's false alarm counts there: (1 + 0 + 1) / 3.
    held_out = out["evaluation_metrics"]["held_out_postprocessing"]
    assert sorted(c["score_threshold"] for c in held_out) == [0.05, 0.35]
    assert out["evaluation_metrics"]["overall"]["competition_metric"] == pytest.approx(2 / 3)
    assert out["evaluation_headline_metrics"]["roc_auc"]["value"] == 1.0
    assert len(out["validation_predictions"]) == 3
