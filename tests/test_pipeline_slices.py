"""Pipeline slices on an in-memory catalog with the SequentialRunner, as Kedro's spaceflights
starter tests them: the data flow between nodes, without a session, MLflow or files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.errors import LabelsError
from pneumonia_kedro.pipelines import evaluate, ingest, split
from tests.conftest import PROJECT_ROOT
from tests.dicom_files import native_dicom

QUALITY = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_quality.yml").read_text())[
    "quality"]
SMALL_IMAGES = {**QUALITY, "min_side": 16}  # the gate of conf/base, for 20-pixel files
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
    # (kept and warned about: ingest.on_conflicting_duplicates defaults to warn)
    assert report["duplicate_images"] == {"groups": 1, "patients": 2,
                                          "with_different_labels": 1,
                                          "first": [["p0", COPY]],
                                          "dropped_patients": {"count": 0, "first": []}}
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
    ensemble = _tiny_ensemble()
    out = run(pipeline, raw_validation_predictions=predictions, validation_patients=truth,
              validation_image_probabilities=probabilities, ensemble=ensemble,
              **{"params:evaluate": {"progress": False}})
    # The post-processing names the models it was tuned for.
    assert out["evaluation_metrics"]["postprocessing"]["models"] == ensemble.record()
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


def cache_catalog(root, splits: tuple[str, ...], dataset_type: type | None = None,
                  **inputs: object) -> DataCatalog:
    """An in-memory catalog whose image caches (and their read-only states) live in ``root``."""
    from pneumonia_kedro.datasets import ImageCacheDataset, ImageCacheStateDataset

    datasets = {name: MemoryDataset(value) for name, value in inputs.items()}
    for name in splits:
        path = str(root / name)
        datasets[f"{name}_image_cache"] = (dataset_type or ImageCacheDataset)(path=path)
        datasets[f"{name}_image_cache_state"] = ImageCacheStateDataset(path=path)
    return DataCatalog(datasets=datasets)


def test_cache_pipeline_decodes_in_its_nodes_resumes_and_reports_the_build(dicoms, tmp_path):
    from pneumonia_kedro.datasets import ImageCacheDataset
    from pneumonia_kedro.imagecache import ImageCache
    from pneumonia_kedro.pipelines import cache

    saves = {"n": 0}

    class KilledOnFourthSave(ImageCacheDataset):
        def save(self, data):
            saves["n"] += 1
            if saves["n"] == 4:  # the train cache's start and two chunks are written
                raise KeyboardInterrupt
            super().save(data)

    inputs = {"train_patients": pd.DataFrame({"patientId": PATIENTS[:6]}),
              "validation_patients": pd.DataFrame({"patientId": [*PATIENTS[6:], COPY]}),
              "train_dicoms": dicoms, "params:quality": QUALITY, "params:engine": None,
              "params:cache": {"image_size": 16, "workers": 0, "chunk_size": 2,
                               "progress": False}}
    pipeline = cache.create_pipeline()
    reference = SequentialRunner().run(pipeline, cache_catalog(tmp_path / "reference",
                                                                ("train", "validation"),
                                                                **inputs))
    report = reference["cache_report"].load()
    assert report["image_size"] == 16
    assert {k: report["train"]["build"][k] for k in ("images", "decoded", "reused")} == {
        "images": 6, "decoded": 6, "reused": 0}
    assert report["validation"]["images"] == 3 and report["validation"]["build"]["decoded"] == 3

    with pytest.raises(KeyboardInterrupt):
        SequentialRunner().run(pipeline, cache_catalog(tmp_path / "resumed",
                                                       ("train", "validation"),
                                                       KilledOnFourthSave, **inputs))
    outputs = SequentialRunner().run(pipeline, cache_catalog(tmp_path / "resumed",
                                                             ("train", "validation"),
                                                             **inputs))
    build = outputs["cache_report"].load()["train"]["build"]
    assert (build["decoded"], build["reused"]) == (2, 4)  # two chunks of two were finished
    for name in ("train", "validation"):
        a, b = tmp_path / "reference" / name, tmp_path / "resumed" / name
        assert (a / "images.npy").read_bytes() == (b / "images.npy").read_bytes()
        pd.testing.assert_frame_equal(ImageCache(a).index, ImageCache(b).index)

    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*")}
    again = SequentialRunner().run(pipeline, cache_catalog(tmp_path / "resumed",
                                                           ("train", "validation"), **inputs))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*")} == files
    assert again["cache_report"].load() == outputs["cache_report"].load()  # the same build


def test_test_cache_node_caches_every_file_at_the_model_size(dicoms, tmp_path):
    from pneumonia_kedro.ensemble import Ensemble
    from pneumonia_kedro.imagecache import ImageCache
    from pneumonia_kedro.models import ModelConfig, TrainedModel
    from pneumonia_kedro.pipelines import inference

    model = TrainedModel(config=ModelConfig(architecture="mobilenet_v3_large_fpn",
                                            pretrained="none", image_size=24),
                         state_dict={}, info={})
    pipeline = inference.create_pipeline(folds=1).only_nodes("cache_test_images_node")
    catalog = cache_catalog(tmp_path, ("test",), test_dicoms=dicoms,
                            ensemble=Ensemble.of(model, None),
                            appearance_reference={"reference": None, "reason": "none here"},
                            **{"params:inference": {"cache": {"workers": 2, "chunk_size": 3,
                                                              "progress": False}},
                               "params:quality": SMALL_IMAGES, "params:engine": None})
    SequentialRunner().run(pipeline, catalog)
    cache = ImageCache(tmp_path / "test")
    assert cache.images.shape == (9, 24, 24) and cache.image_size == 24
    assert cache.index["patientId"].tolist() == dicoms.patient_ids
    assert (cache.index["status"] == "ok").all()
    assert cache.manifest["build"]["decoded"] == 9
    np.testing.assert_array_equal(cache.images[0], cache.images[-1])  # p8 is p0's copy


def _tiny_ensemble():
    """An untrained tiny detector with an untrained classifier: their answers are arbitrary
    but fixed, which is all a data-flow test needs."""
    import torch

    from pneumonia_kedro.classifier import TrainedClassifier, build_classifier
    from pneumonia_kedro.ensemble import Ensemble
    from pneumonia_kedro.models import TrainedModel, build_model
    from tests.test_training import TINY_MODEL

    torch.manual_seed(0)
    return Ensemble.of(
        TrainedModel(config=TINY_MODEL, state_dict=build_model(TINY_MODEL).state_dict(),
                     info={}),
        TrainedClassifier("resnet18", 32, build_classifier("resnet18").state_dict(), {}))


def _tiny_cache(dicoms: DicomFolder, ensemble, folder, params: dict):
    from pneumonia_kedro.imagecache import ImageCache, build
    from pneumonia_kedro.pipelines.inference.nodes import plan_test_cache

    build(plan_test_cache(dicoms, ensemble, params, SMALL_IMAGES, None), folder)
    return ImageCache(folder)


class _Kept(MemoryDataset):
    """A MemoryDataset the runner does not empty after its last reader: the test reads it."""

    def _release(self) -> None:
        pass


def _in_memory(values: dict[str, object], kept: tuple[str, ...]) -> DataCatalog:
    # Models and caches are handed on as they are (a deep copy would copy every weight).
    datasets = {name: MemoryDataset(value, copy_mode="assign") for name, value in
                values.items()}
    return DataCatalog(datasets={**datasets, **{name: _Kept() for name in kept}})


@pytest.mark.slow  # models over a built cache: outside the quick loop
def test_inference_pipeline_predicts_cached_images_into_a_submission(dicoms, tmp_path):
    from pneumonia_kedro.inference import cached_squares
    from pneumonia_kedro.pipelines import inference
    from pneumonia_kedro.prediction import predict, prediction_settings
    from tests.submission_format import parse_prediction_string

    params = {"cache": {"workers": 0, "progress": False},
              "batch_size": 4, "progress": False, "overlay_patients": ["p1", "missing"]}
    postprocessing = {"score_threshold": 0.0, "nms_iou": 0.3, "max_boxes": 2, "shrink": 0.9,
                      "gating": {"rule": "product", "threshold": 0.0},
                      "tta": {"hflip": True, "fusion_iou": 0.5}}
    ensemble = _tiny_ensemble()
    cache = _tiny_cache(dicoms, ensemble, tmp_path / "test", params)
    pipeline = inference.create_pipeline(folds=1).from_nodes("predict_test_node")
    catalog = _in_memory({"ensemble": ensemble, "test_image_cache": cache,
                          "test_dicoms": dicoms,
                          "postprocessing": {**postprocessing, "models": ensemble.record()},
                          "sample_submission": pd.DataFrame({"patientId": dicoms.patient_ids}),
                          "params:inference": params, "params:engine": None},
                         kept=("test_predictions",))
    out = {name: dataset.load() for name, dataset in
           SequentialRunner().run(pipeline, catalog).items()}
    catalog_predictions = catalog["test_predictions"].load()

    # The node's boxes are prediction.predict's, with the TTA the post-processing was tuned
    # with and the classifier gating them.
    tta, values = prediction_settings(postprocessing)
    expected = predict(ensemble.build(), cached_squares(cache), tta, values, batch_size=4)
    pd.testing.assert_frame_equal(catalog_predictions[list(expected.boxes.columns)],
                                  expected.boxes)
    np.testing.assert_allclose(
        catalog_predictions["classifier_probability"],
        catalog_predictions["patientId"].map(expected.classifier_probability))
    assert set(catalog_predictions["view_position"]) <= {"AP", "PA"}
    assert len(catalog_predictions) and (catalog_predictions["image_probability"] > 0).all()

    submission, report = out["submission"], out["inference_report"]
    assert submission["patientId"].tolist() == sorted(dicoms.patient_ids)
    assert report["predicted"] == 9 and report["checked_against_sample"]
    assert report["boxes"] == len(catalog_predictions)
    for row in submission.to_dict("records"):
        boxes, scores = parse_prediction_string(row["PredictionString"])
        rows = expected.boxes.loc[expected.boxes["patientId"] == row["patientId"]]
        np.testing.assert_allclose(boxes, rows[["x", "y", "width", "height"]], atol=0.05)
        np.testing.assert_allclose(scores, rows["score"], atol=5e-5)
    assert sorted(out["test_overlays"]) == ["p1.png"]


@pytest.mark.slow  # models over a built cache: outside the quick loop
def test_evaluation_predicts_keeps_variants_apart_tunes_and_scores(dicoms, tmp_path):
    from pneumonia_kedro.pipelines import evaluate

    patients = pd.DataFrame({
        "patientId": [*PATIENTS, COPY], "Target": [int(p in BOXES) for p in [*PATIENTS, COPY]],
        "boxes": [[[b / 20 for b in box] for box in BOXES.get(p, [])]
                  for p in [*PATIENTS, COPY]],
        "view_position": ["AP" if i % 2 else "PA" for i in range(9)]})
    ensemble = _tiny_ensemble()
    cache = _tiny_cache(dicoms, ensemble, tmp_path / "validation",
                        {"cache": {"workers": 0, "progress": False}})
    params = {"batch_size": 4, "progress": False, "tta": {"hflip": True},
              "search": {"score_threshold": [0.05, 0.5], "nms_iou": [0.3], "shrink": [1.0],
                         "max_boxes": [2], "gating_rule": ["none", "product"]},
              "bootstrap": {"resamples": 20}}
    pipeline = evaluate.create_pipeline().only_nodes(
        "predict_validation_node", "predict_validation_probabilities_node",
        "tune_postprocessing_node", "evaluate_node")
    catalog = _in_memory({"ensemble": ensemble, "validation_image_cache": cache,
                          "validation_patients": patients, "params:evaluate": params},
                         kept=("raw_validation_predictions", "validation_image_probabilities"))
    out = {name: dataset.load() for name, dataset in
           SequentialRunner().run(pipeline, catalog).items()}
    raw = catalog["raw_validation_predictions"].load()
    assert set(raw["variants"]) == {2} and set(raw["variant"]) == {0, 1}  # plain, mirrored
    assert set(raw["patientId"]) == set(patients["patientId"])
    probabilities = catalog["validation_image_probabilities"].load()
    assert list(probabilities.columns) == ["patientId", "probability"]
    assert probabilities["patientId"].tolist() == [*PATIENTS, COPY]
    assert probabilities["probability"].between(0, 1).all()
    chosen = out["evaluation_metrics"]["postprocessing"]  # what inference gets
    assert chosen["tta"]["hflip"] and chosen["gating"]["rule"] in ("none", "product")
    assert out["evaluation_metrics"]["overall"]["images"] == 9
    assert len(out["evaluation_metrics"]["held_out_postprocessing"]) == 2
    assert len(out["postprocessing_search"]) == 2 * 2
