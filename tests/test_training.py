"""Training: whole-image negatives, resume equals uninterrupted, DDP equals one process,
offline COCO weights fail clearly, trained models reload without pickle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pneumonia_kedro.datasets import TrainedModelDataset
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.errors import WeightsUnavailableError
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, plan
from pneumonia_kedro.models import ModelConfig, TrainedModel, build_model
from pneumonia_kedro.training import (
    AugmentConfig,
    CachedDetectionDataset,
    CheckpointStore,
    TrainConfig,
    predict,
    train_model,
)
from tests.conftest import write_demo_dicoms

SIZE = 64
TINY_MODEL = ModelConfig(
    architecture="mobilenet_v3_large_fpn", pretrained="none", trainable="all", image_size=SIZE,
    anchor_sizes=((8, 16, 32, 64),) * 3, anchor_ratios=(1.0, 2.0),
    rpn_batch_size_per_image=32, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_batch_size_per_image=16,
    box_head_size=32, box_detections_per_img=5,
)
TINY_TRAIN = TrainConfig(epochs=2, batch_size=4, validation_batch_size=4, learning_rate=0.005,
                         warmup_iterations=1, progress=False, num_workers=0, seed=3,
                         augment=AugmentConfig())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[ImageCache, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("train_dicoms")
    patients = write_demo_dicoms(folder, n_positive=4, n_negative=4, seed=5)
    dicoms = DicomFolder.scan(str(folder))
    cache_path = tmp_path_factory.mktemp("cache") / "all"
    build(plan(dicoms, dicoms.patient_ids, CacheConfig(image_size=SIZE, workers=0,
                                                       progress=False)), cache_path)
    return ImageCache(cache_path), patients


def datasets(tiny_data, negative_boxes="empty"):
    cache, patients = tiny_data
    return (CachedDetectionDataset(cache, patients, negative_boxes, TINY_TRAIN.augment),
            CachedDetectionDataset(cache, patients, negative_boxes))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], atol=atol, rtol=0 if atol == 0 else 1e-3,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_negatives_have_empty_targets_or_the_notebook_whole_image_box(tiny_data):
    cache, patients = tiny_data
    negative = patients.loc[patients["Target"] == 0, "patientId"].iloc[0]
    empty = CachedDetectionDataset(cache, patients)
    whole = CachedDetectionDataset(cache, patients, negative_boxes="whole_image")
    index = empty.patient_ids.index(negative)
    image, target = empty[index]
    assert image.dtype == torch.uint8 and image.shape == (1, SIZE, SIZE)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    _, whole_target = whole[index]
    np.testing.assert_array_equal(whole_target["boxes"], [[0.0, 0.0, SIZE, SIZE]])
    assert whole_target["labels"].tolist() == [1]


def test_augmentation_keeps_boxes_with_the_image(tiny_data):
    cache, patients = tiny_data
    flip_only = AugmentConfig(horizontal_flip=1.0, scale=(1.0, 1.0), translate=0.0,
                              brightness=0.0, contrast=0.0)
    plain = CachedDetectionDataset(cache, patients)
    flipped = CachedDetectionDataset(cache, patients, augment=flip_only)
    index = next(i for i, b in enumerate(plain.boxes) if len(b))
    image, target = plain[index]
    flipped_image, flipped_target = flipped[index]
    torch.testing.assert_close(flipped_image, image.flip(-1))
    expected = target["boxes"].copy()
    expected[:, [0, 2]] = SIZE - target["boxes"][:, [2, 0]]
    np.testing.assert_allclose(flipped_target["boxes"], expected)


@pytest.mark.slow  # trains or builds several networks: outside the quick loop
def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_data, tmp_path):
    train_data, validation_data = datasets(tiny_data)
    config = replace(TINY_TRAIN, epochs=3, scheduler="cosine")  # the demo's schedule
    full = train_model(TINY_MODEL, config, train_data, validation_data,
                       CheckpointStore(tmp_path / "full"))
    store = CheckpointStore(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train_model(TINY_MODEL, config, train_data, validation_data, store,
                    on_epoch_end=_stop_after(2))
    last = torch.load(store.last_file, weights_only=True)  # checkpoints load without pickle
    assert last["epoch"] == 1 and len(last["history"]) == 2
    resumed = train_model(TINY_MODEL, config, train_data, validation_data, store)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert_same_weights(full.last_state, resumed.last_state)
    assert_same_weights(full.best_state, resumed.best_state)
    assert resumed.best_epoch == full.best_epoch


def _stop_after(epochs: int):
    """An epoch callback that interrupts training like Ctrl-C once ``epochs`` are done."""
    def callback(metrics: dict, epoch: int) -> None:
        if epoch == epochs:
            raise KeyboardInterrupt

    return callback


def test_resume_stops_cleanly_on_interrupt(tiny_data, tmp_path):
    train_data, validation_data = datasets(tiny_data)
    with pytest.raises(KeyboardInterrupt):
        train_model(TINY_MODEL, TINY_TRAIN, train_data, validation_data,
                    CheckpointStore(tmp_path), on_epoch_end=_stop_after(1))
    assert (tmp_path / "last.pt").is_file() and not list(tmp_path.glob("*.partial"))


def test_only_a_checkpoint_of_the_same_settings_and_data_is_resumed(tiny_data, tmp_path, caplog):
    train_data, validation_data = datasets(tiny_data)
    config = replace(TINY_TRAIN, epochs=1)
    store = CheckpointStore(tmp_path, fingerprint="settings-a")
    first = train_model(TINY_MODEL, config, train_data, validation_data, store)
    logged: list[int] = []
    with caplog.at_level("INFO", logger="pneumonia_kedro.training"):
        again = train_model(TINY_MODEL, config, train_data, validation_data, store,
                            on_epoch_end=lambda metrics, epoch: logged.append(epoch))
    assert "resuming after epoch 1 of 1" in caplog.text
    assert again.history == first.history and logged == [1]  # the curve reaches the new run
    assert_same_weights(first.best_state, again.best_state)
    caplog.clear()
    with caplog.at_level("INFO", logger="pneumonia_kedro.training"):
        train_model(TINY_MODEL, config, train_data, validation_data,
                    store.bound_to("settings-b"))
    assert "from other settings or data; training from the first epoch" in caplog.text
    assert torch.load(store.last_file, weights_only=True)["fingerprint"] == "settings-b"


def test_training_fingerprint_follows_what_changes_the_result(tiny_data):
    from pneumonia_kedro.training import training_fingerprint

    cache, patients = tiny_data

    def digest(model=TINY_MODEL, config=TINY_TRAIN, table=patients):
        return training_fingerprint(model, config, [cache], [table])

    assert digest() == digest(config=replace(TINY_TRAIN, progress=True, resume=False,
                                             num_workers=2))
    assert digest() != digest(config=replace(TINY_TRAIN, learning_rate=0.01))
    assert digest() != digest(model=replace(TINY_MODEL, box_head_size=64))
    assert digest() != digest(table=patients.iloc[1:])


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(tiny_data):
    train_data, validation_data = datasets(tiny_data)
    config = replace(TINY_TRAIN, epochs=1, batch_size=4, augment=AugmentConfig(
        horizontal_flip=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0))
    # Frozen BatchNorm: on the CPU (gloo) there is no SyncBatchNorm to share batch statistics.
    model = replace(TINY_MODEL, freeze_batchnorm=True)
    one = train_model(model, config, train_data, validation_data)
    two = train_model(model, replace(config, world_size=2), train_data, validation_data)
    assert_same_weights(one.last_state, two.last_state, atol=5e-3)
    assert [h["epoch"] for h in two.history] == [1]
    assert two.history[0]["train_loss"] == pytest.approx(one.history[0]["train_loss"],
                                                         rel=1e-2)


def _rank_mean(rank: int, port: int, results: str) -> None:
    import torch.distributed as dist

    from pneumonia_kedro.training.fit import _mean_over_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    mean = _mean_over_ranks([1.0, 3.0][rank], torch.device("cpu"), distributed=True)
    torch.save(mean, f"{results}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_train_loss_is_the_mean_over_ranks(tmp_path):
    """Each DDP rank sees its share of the batch: the logged loss averages them (it was rank
    0's share alone)."""
    from pneumonia_kedro.ui import free_port

    torch.multiprocessing.spawn(_rank_mean, nprocs=2, join=True,
                                args=(free_port(), str(tmp_path / "mean")))
    assert [torch.load(tmp_path / f"mean.{rank}") for rank in (0, 1)] == [2.0, 2.0]


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """The CPU side of an exact AMP resume: the loss scale and its growth tracker are saved
    with the last checkpoint and restored (the GPU check covers the CUDA side)."""
    from pneumonia_kedro.training import Optimisation
    from pneumonia_kedro.training.checkpoints import restore, resume_state

    def optimisation(model: torch.nn.Module) -> Optimisation:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return Optimisation(optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1))

    model = torch.nn.Linear(3, 1)
    trained = optimisation(model)
    optimizer = trained.optimizer
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for _ in range(2):  # two good steps: the growth tracker counts them
        optimizer.zero_grad()
        scaler.scale(model(torch.ones(2, 3)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    scaler.update(new_scale=256.0)
    store = CheckpointStore(tmp_path, "fp")
    store.save_last(resume_state(model, trained, scaler, epoch=0))

    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    fresh_model = torch.nn.Linear(3, 1)
    restore(store.load_last(), fresh_model, optimisation(fresh_model), fresh)
    assert fresh.get_scale() == 256.0
    assert fresh.state_dict() == scaler.state_dict()
    assert "rng" not in store.load_last()  # epochs reseed from seed + epoch: nothing to keep
    # A checkpoint of a run without AMP restores into an enabled scaler without complaint.
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    store.save_last(resume_state(model, trained, disabled, epoch=0))
    restore(store.load_last(), fresh_model, optimisation(fresh_model), fresh)
    assert fresh.get_scale() == 256.0


def test_whole_image_negatives_still_train(tiny_data):
    train_data, validation_data = datasets(tiny_data, negative_boxes="whole_image")
    result = train_model(TINY_MODEL, replace(TINY_TRAIN, epochs=1), train_data,
                         validation_data)
    assert np.isfinite(result.history[0]["train_loss"])


def test_trained_model_round_trips_through_its_dataset(tiny_data, tmp_path):
    train_data, validation_data = datasets(tiny_data)
    result = train_model(TINY_MODEL, replace(TINY_TRAIN, epochs=1), train_data,
                         validation_data)
    trained = TrainedModel(config=TINY_MODEL, state_dict=result.best_state, info={"x": 1})
    dataset = TrainedModelDataset(filepath=str(tmp_path / "model.pt"))
    dataset.save(trained)
    reloaded = dataset.load()
    assert reloaded.config == TINY_MODEL and reloaded.info == {"x": 1}
    before = predict(trained.build(), validation_data, torch.device("cpu"))
    after = predict(reloaded.build(), validation_data, torch.device("cpu"))
    for (boxes_a, scores_a), (boxes_b, scores_b) in zip(before, after, strict=True):
        np.testing.assert_array_equal(boxes_a, boxes_b)
        np.testing.assert_array_equal(scores_a, scores_b)


def test_offline_coco_weights_fail_with_the_file_to_provide(tmp_path, monkeypatch):
    import urllib.error

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"no network in this test ({url})")

    # Offline by construction, so the test means the same on a machine with a network.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(ModelConfig(architecture="resnet50_fpn", pretrained="coco"))
    message = str(info.value)
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in message
    assert str(Path(tmp_path / "torch" / "hub" / "checkpoints")) in message


def test_local_weights_file_is_loaded_safely(tmp_path):
    source = build_model(TINY_MODEL)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    loaded = build_model(replace(TINY_MODEL, pretrained=str(tmp_path / "weights.pth")))
    assert_same_weights(source.state_dict(), loaded.state_dict())
    with pytest.raises(WeightsUnavailableError, match="weights file not found"):
        build_model(replace(TINY_MODEL, pretrained=str(tmp_path / "missing.pth")))


def test_world_size_auto_is_one_process_per_visible_gpu(monkeypatch):
    from pneumonia_kedro.config import from_params
    from pneumonia_kedro.training.config import auto_world_size

    assert from_params(TrainConfig, {"world_size": "auto"}, "train").world_size == "auto"
    assert auto_world_size("cpu") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert auto_world_size("auto") == 4 and auto_world_size("cuda") == 4
    assert auto_world_size("cpu") == 1
    with pytest.raises(Exception, match="world_size"):
        from_params(TrainConfig, {"world_size": "all"}, "train")


def test_auto_device_places_fold_i_on_gpu_i_mod_the_gpu_count(monkeypatch):
    """The device comes from the parameters; a cross-validation fold's index (bound to its
    nodes) picks its GPU, so folds trained side by side each get their own."""
    from pneumonia_kedro.training import resolve_device

    assert resolve_device("auto", fold=1) == torch.device("cpu")  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device("auto", fold) for fold in (0, 1, 2, None)] == [
        torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cuda:0"),
        torch.device("cuda")]
    assert resolve_device("cpu", fold=1) == torch.device("cpu")
    assert resolve_device("cuda", fold=1) == torch.device("cuda")


def test_a_fold_keeps_its_checkpoints_in_its_own_subfolder(tmp_path):
    from pneumonia_kedro.training import checkpoint_store

    assert checkpoint_store(None, "fp") is None
    assert checkpoint_store(str(tmp_path), "fp").path == tmp_path
    fold = checkpoint_store(str(tmp_path), "fp", fold=2)
    assert fold.path == tmp_path / "fold_2" and fold.fingerprint == "fp"


def test_fewer_patients_than_a_batch_still_train_one_batch():
    from pneumonia_kedro.training import EpochBatchSampler

    assert list(EpochBatchSampler(3, 4, seed=0)) != [] and len(EpochBatchSampler(3, 4, 0)) == 1
    assert len(EpochBatchSampler(9, 4, 0)) == 2  # the last partial batch is dropped
    assert list(EpochBatchSampler(3, 4, 0, rank=0, world_size=2)) == []  # DDP: none


def test_epoch_logger_writes_curves_to_a_real_mlflow_store(tmp_path):
    """One logger for the detector and the classifier (prefixed), by run id: what a DDP
    rank-0 process, outside the node's process, can use."""
    import mlflow

    from pneumonia_kedro.training import MlflowEpochLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("curves", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(experiment).info.run_id
    assert MlflowEpochLogger.for_active_run() is None  # outside a tracked run
    detector = MlflowEpochLogger(uri, run_id)
    classifier = MlflowEpochLogger(uri, run_id, prefix="classifier_")
    for epoch, loss in ((1, 0.9), (2, 0.5)):
        detector({"train_loss": loss, "validation_competition_metric": loss / 10}, epoch)
    classifier({"validation_roc_auc": 0.75}, 1)
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
               for key in ("train_loss", "validation_competition_metric",
                           "classifier_validation_roc_auc")}
    assert history == {"train_loss": [(1, 0.9), (2, 0.5)],
                       "validation_competition_metric": [(1, 0.09), (2, 0.05)],
                       "classifier_validation_roc_auc": [(1, 0.75)]}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            active = MlflowEpochLogger.for_active_run(prefix="classifier_")
        assert (active.tracking_uri, active.run_id, active.prefix) == (
            uri, run.info.run_id, "classifier_")
    finally:
        mlflow.set_tracking_uri(previous)


def test_final_metrics_say_whether_a_run_resumed():
    from pneumonia_kedro.training import TrainingResult, final_metrics, history_table

    history = [{"epoch": e, "validation_competition_metric": 0.1 * e} for e in (1, 2, 3)]
    resumed = TrainingResult({}, {}, 3, 0.3, history, resumed_after_epoch=2)
    assert final_metrics(resumed, "validation_competition_metric") == {
        "best_epoch": {"value": 3.0, "step": 0},
        "best_validation_competition_metric": {"value": 0.3, "step": 0},
        "resumed_after_epoch": {"value": 2.0, "step": 0}}
    assert history_table(resumed)["resumed_from_checkpoint"].tolist() == [True, True, False]
    scratch = TrainingResult({}, {}, 3, 0.3, history)
    assert "resumed_after_epoch" not in final_metrics(scratch, "x")  # no 0 that reads as resumed
    assert not history_table(scratch)["resumed_from_checkpoint"].any()
