"""The image-level classifier: networks with one output, learning a clear signal, weights
that reload without pickle, offline ImageNet weights failing clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pneumonia_kedro.classifier import (
    ClassifierConfig,
    build_classifier,
    predict_probabilities,
    train_classifier,
)
from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.datasets import TrainedModelDataset
from pneumonia_kedro.errors import WeightsUnavailableError
from pneumonia_kedro.imagecache import ImageCache

SIZE = 32


def synthetic_cache(folder: Path, n: int, seed: int) -> tuple[ImageCache, pd.Series]:
    """Noise images; the positives carry a bright patch in a random place (the opacity)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    targets = pd.Series((np.arange(n) % 2).astype(int),
                        index=pd.Index([f"p{seed}-{i:03d}" for i in range(n)], name="patientId"))
    images = rng.integers(0, 90, (n, SIZE, SIZE), dtype=np.uint8)
    for i in np.flatnonzero(targets.to_numpy()):
        y, x = rng.integers(2, SIZE - 14, 2)
        images[i, y:y + 12, x:x + 10] = 230
    np.save(folder / "images.npy", images)
    pd.DataFrame({"patientId": targets.index, "status": "ok", "row": np.arange(n)}) \
        .to_parquet(folder / "index.parquet")
    (folder / "manifest.json").write_text(json.dumps({"image_size": SIZE}))
    return ImageCache(folder), targets


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small", "efficientnet_b0",
                                          "densenet121"])
def test_every_architecture_gives_one_opacity_logit(architecture):
    model = build_classifier(architecture, "none").eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 1)


def test_a_clear_signal_is_learned_and_the_best_epoch_reloads(tmp_path):
    train_cache, train_targets = synthetic_cache(tmp_path / "train", 48, seed=1)
    validation_cache, validation_targets = synthetic_cache(tmp_path / "validation", 24, seed=2)
    config = ClassifierConfig(architecture="resnet18", pretrained="none", epochs=4,
                              batch_size=8, learning_rate=0.003, progress=False, seed=0,
                              device="cpu")
    trained, result = train_classifier(train_cache, train_targets, validation_cache,
                                       validation_targets, config)
    history = pd.DataFrame(result.history)
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert trained.info["validation_roc_auc"] == history["validation_roc_auc"].max() >= 0.95
    assert trained.image_size == SIZE  # image_size null: the cache's
    dataset = TrainedModelDataset(filepath=str(tmp_path / "classifier.pt"), kind="classifier")
    dataset.save(trained)
    reloaded = dataset.load()
    before = predict_probabilities(trained, validation_cache, torch.device("cpu"))
    after = predict_probabilities(reloaded, validation_cache, torch.device("cpu"))
    pd.testing.assert_series_equal(before, after)
    assert list(before.index) == list(validation_targets.index)
    # Mirrored too: the mean of the image's and its mirror's probabilities.
    mirrored = predict_probabilities(trained, validation_cache, torch.device("cpu"), hflip=True)
    assert not np.allclose(mirrored, before) and ((mirrored >= 0) & (mirrored <= 1)).all()


def test_same_seed_same_classifier(tmp_path):
    cache, targets = synthetic_cache(tmp_path / "cache", 16, seed=3)
    config = ClassifierConfig(architecture="mobilenet_v3_small", pretrained="none", epochs=1,
                              batch_size=8, progress=False, seed=4, device="cpu")
    first, _ = train_classifier(cache, targets, cache, targets, config)
    second, _ = train_classifier(cache, targets, cache, targets, config)
    assert_same_weights(first.state_dict, second.state_dict)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def _stop_after(epochs: int):
    """An epoch callback that interrupts training like Ctrl-C once ``epochs`` are done."""
    def callback(metrics: dict, epoch: int) -> None:
        if epoch == epochs:
            raise KeyboardInterrupt

    return callback


@pytest.mark.slow  # trains or builds several networks: outside the quick loop
def test_an_interrupted_classifier_resumes_to_the_uninterrupted_weights(tmp_path):
    """The classifier trains through the detector's engine: checkpoints after every epoch,
    and a resumed run ends with exactly the weights of an uninterrupted one (on the CPU)."""
    from pneumonia_kedro.training import CheckpointStore

    train_cache, train_targets = synthetic_cache(tmp_path / "train", 24, seed=5)
    validation_cache, validation_targets = synthetic_cache(tmp_path / "validation", 12, seed=6)
    config = ClassifierConfig(architecture="resnet18", pretrained="none", epochs=3,
                              batch_size=8, learning_rate=0.003, progress=False, seed=1,
                              device="cpu")
    data = (train_cache, train_targets, validation_cache, validation_targets, config)
    full, full_result = train_classifier(*data, CheckpointStore(tmp_path / "full", "fp"))
    store = CheckpointStore(tmp_path / "interrupted", "fp")
    with pytest.raises(KeyboardInterrupt):
        train_classifier(*data, store, on_epoch_end=_stop_after(2))
    assert torch.load(store.last_file, weights_only=True)["epoch"] == 1
    curve: list[int] = []
    resumed, result = train_classifier(*data, store,
                                       on_epoch_end=lambda metrics, epoch: curve.append(epoch))
    assert result.resumed_after_epoch == 2 and full_result.resumed_after_epoch == 0
    assert curve == [1, 2, 3]  # the replayed epochs reach the new run's curve too
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert resumed.info["best_epoch"] == full.info["best_epoch"]
    assert_same_weights(full.state_dict, resumed.state_dict)
    assert_same_weights(torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"],
                        torch.load(store.last_file, weights_only=True)["model"])
    # The per-step cosine schedule continued where it stopped: the same last learning rate.
    assert result.history[-1]["learning_rate"] == full_result.history[-1]["learning_rate"]


def test_offline_imagenet_weights_fail_with_the_file_to_provide(tmp_path, monkeypatch):
    import urllib.error

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"no network in this test ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd\.pth") as caught:
        build_classifier("resnet18", "imagenet")
    assert "set classifier.pretrained to the path of a local weights file" in str(caught.value)


def test_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="classifier.architecture"):
        from_params(ClassifierConfig, {"architecture": "vit_h_14"}, "classifier")
    with pytest.raises(ConfigError, match="classifier.epochs = 0"):
        from_params(ClassifierConfig, {"epochs": 0}, "classifier")


@pytest.mark.slow
def test_the_classifier_trains_data_parallel_in_two_gloo_processes(tmp_path):
    """DDP through the shared engine: two CPU processes each take half of every global batch;
    rank 0 validates, checkpoints and returns the result."""
    from pneumonia_kedro.training import CheckpointStore

    cache, targets = synthetic_cache(tmp_path / "cache", 16, seed=7)
    config = ClassifierConfig(architecture="resnet18", pretrained="none", epochs=2,
                              batch_size=8, progress=False, seed=2, device="cpu", world_size=2)
    with pytest.raises(ValueError, match="classifier.batch_size 7 must be a multiple"):
        train_classifier(cache, targets, cache, targets,
                         ClassifierConfig(batch_size=7, world_size=2, device="cpu"))
    trained, result = train_classifier(cache, targets, cache, targets, config,
                                       CheckpointStore(tmp_path / "checkpoints", "fp"))
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["settings"]["world_size"] == 2
    assert trained.state_dict.keys() == last["model"].keys()


def test_classifier_weights_files_are_checked_and_named_as_classifier_pretrained(tmp_path):
    from torchvision.models import resnet34

    with pytest.raises(WeightsUnavailableError,
                       match=r"missing.pth: weights file not found \(classifier.pretrained\)"):
        build_classifier("resnet18", str(tmp_path / "missing.pth"))
    # A ResNet-34 holds every ResNet-18 tensor, and more: another network all the same.
    torch.save(resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(WeightsUnavailableError, match=(
            r"resnet34.pth \(classifier.pretrained\) does not fit the ResNet: 120 of the "
            r"network's 122 tensors are in the file's 218 with the same shape; 80 of the "
            r"file's tensors are not in the network \(first: 'layer1.2.conv1.weight'\)"
            r".*classifier.partial_weights: true")):
        build_classifier("resnet18", str(tmp_path / "resnet34.pth"))
    loaded = build_classifier("resnet18", str(tmp_path / "resnet34.pth"), partial_weights=True)
    assert loaded.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 1)


def test_a_trained_classifier_file_fine_tunes_with_its_own_head(tmp_path):
    torch.manual_seed(5)
    trained = build_classifier("resnet18", "none")
    # The file TrainedModelDataset writes: the weights under state_dict, head included.
    torch.save({"model_config": {"architecture": "resnet18", "image_size": 32},
                "state_dict": trained.state_dict(), "info": {}}, tmp_path / "trained.pt")
    loaded = build_classifier("resnet18", str(tmp_path / "trained.pt"))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
