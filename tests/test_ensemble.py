"""The fold ensemble as data: choosing members, its version, its files, and fused
predictions that depend on every member."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pneumonia_kedro.boxes import Letterbox
from pneumonia_kedro.classifier import TrainedClassifier, build_classifier
from pneumonia_kedro.config import ConfigError
from pneumonia_kedro.ensemble import Ensemble, load_ensemble, save_ensemble
from pneumonia_kedro.inference import Square
from pneumonia_kedro.models import TrainedModel, build_model
from pneumonia_kedro.postprocess import PostprocessConfig
from pneumonia_kedro.prediction import predict
from tests.test_training import TINY_MODEL


def _member(seed: int) -> tuple[TrainedModel, TrainedClassifier]:
    torch.manual_seed(seed)
    detector = TrainedModel(config=TINY_MODEL, state_dict=build_model(TINY_MODEL).state_dict(),
                            info={})
    classifier = TrainedClassifier("resnet18", 32, build_classifier("resnet18").state_dict(),
                                   {})
    return detector, classifier


@pytest.fixture(scope="module")
def folds() -> Ensemble:
    return Ensemble.of(*_member(1), *_member(2))


def test_members_are_named_by_fold_and_chosen_by_name(folds: Ensemble):
    assert folds.names == ["fold_0", "fold_1"] and folds.has_classifiers
    assert folds.select("ensemble") is folds
    alone = folds.select("fold_1")
    assert alone.names == ["fold_1"] and alone.detectors == [folds.detectors[1]]
    assert alone.version == folds.detectors[1].version
    assert folds.version.startswith(f"{TINY_MODEL.architecture}-x2-")
    assert len(folds.version) <= 64  # a DICOM LO value
    with pytest.raises(ConfigError, match=r"inference.models = 'fold_7'.*fold_0, fold_1"):
        folds.select("fold_7")
    single = Ensemble.of(*_member(3))
    assert single.names == ["model"] and single.version == single.detectors[0].version
    with pytest.raises(ValueError, match="pairs"):
        Ensemble.of(folds.detectors[0])


def test_files_round_trip_and_a_single_model_s_older_file_still_loads(folds, tmp_path):
    assert save_ensemble(folds, tmp_path / "weights.pt", tmp_path / "classifier.pt")
    loaded = load_ensemble(tmp_path / "weights.pt", tmp_path / "classifier.pt")
    assert loaded.names == folds.names and loaded.version == folds.version
    assert [c.version for c in loaded.classifiers] == [c.version for c in folds.classifiers]
    # The format of models logged before there were folds: one model at the top level.
    detector = folds.detectors[0]
    torch.save({"model_config": detector.config.to_dict(), "state_dict": detector.state_dict},
               tmp_path / "old.pt")
    old = load_ensemble(tmp_path / "old.pt", tmp_path / "missing.pt")
    assert old.names == ["model"] and old.version == detector.version
    assert old.classifiers == [None] and not old.has_classifiers
    without = Ensemble.of(detector, None)
    assert not save_ensemble(without, tmp_path / "w.pt", tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.slow  # trains or builds several networks: outside the quick loop
def test_networks_are_built_as_asked():
    folds = Ensemble.of(*_member(1), *_member(2))
    both = folds.build("cpu")
    assert len(both.detectors) == 2 and both.classifier_sizes == [32, 32]
    assert both.device == torch.device("cpu")
    assert folds.build("cpu", classifiers=False).classifiers == []
    assert folds.build("cpu", detectors=False).detectors == []
    # A gate needs every member's classifier: one member without one means no gate.
    mixed = Ensemble.of(folds.detectors[0], folds.classifiers[0], folds.detectors[1], None)
    assert mixed.build("cpu").classifiers == []


@pytest.mark.slow  # two detectors in every variant: outside the quick loop
def test_the_fused_answer_depends_on_every_member(folds: Ensemble):
    images = torch.randint(0, 255, (2, 64, 64), dtype=torch.uint8).numpy()
    squares = [Square(f"p{i}", image, Letterbox.fit(64, 64, 64))
               for i, image in enumerate(images)]
    networks = folds.build()
    keep_all = PostprocessConfig(score_threshold=0.0, nms_iou=1.0, max_boxes=1000)
    fused = predict(networks, squares, None, keep_all)
    alone = [predict(dataclasses.replace(networks, detectors=[m]), squares, None, keep_all)
             for m in networks.detectors]
    for patient_id in ("p0", "p1"):
        scores = fused.boxes.loc[fused.boxes["patientId"] == patient_id, "score"]
        assert len(scores)
        for one in alone:
            assert not np.array_equal(
                scores, one.boxes.loc[one.boxes["patientId"] == patient_id, "score"])
    each = [dataclasses.replace(networks, classifiers=[m], classifier_sizes=[size])
            .classify(torch.from_numpy(images)[:, None], hflip=False)
            for m, size in zip(networks.classifiers, networks.classifier_sizes, strict=True)]
    np.testing.assert_allclose(fused.classifier_probability, (each[0] + each[1]) / 2)


def test_with_several_gpus_each_fold_gets_its_own(monkeypatch):
    from pneumonia_kedro.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # The fold comes from the node's parameters: no thread or hook state decides it.
    assert {fold: resolve_device("auto", fold) for fold in (0, 1, 2, None)} == {
        0: torch.device("cuda:0"), 1: torch.device("cuda:1"), 2: torch.device("cuda:0"),
        None: torch.device("cuda")}
    assert resolve_device("cpu", 1) == torch.device("cpu")


def test_the_record_names_every_member_s_weights_and_differences_are_spelled_out(folds):
    from pneumonia_kedro.ensemble import differences

    record = folds.record()
    assert record["version"] == folds.version
    assert record["members"] == {
        name: {"detector": d.version, "classifier": c.version}
        for name, d, c in zip(folds.names, folds.detectors, folds.classifiers, strict=True)}
    assert differences(record, record) == []
    assert differences(folds.select("fold_0").record(), record) == []  # one fold of them
    single = Ensemble.of(folds.detectors[0], None)
    assert differences(single.record(), record) == [
        "model is not among its models (fold_0, fold_1)"]
    swapped = Ensemble(["fold_0"], [folds.detectors[1]], [folds.classifiers[0]])
    assert differences(swapped.record(), record) == [
        f"fold_0's detector is {folds.detectors[1].version}, it was tuned for "
        f"{folds.detectors[0].version}"]
    without = Ensemble(["fold_1"], [folds.detectors[1]], [None])
    assert differences(without.record(), record) == [
        f"fold_1's classifier is None, it was tuned for {folds.classifiers[1].version}"]
    assert differences(record, None) == differences(record, {"version": "x"}) == [
        "it names no models (written before post-processing recorded them)"]
