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
                              batch_size=8, learning_rate=0.003, progress=False, seed=0)
    trained, history = train_classifier(train_cache, train_targets, validation_cache,
                                        validation_targets, config, torch.device("cpu"))
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
                              batch_size=8, progress=False, seed=4)
    first, _ = train_classifier(cache, targets, cache, targets, config, torch.device("cpu"))
    second, _ = train_classifier(cache, targets, cache, targets, config, torch.device("cpu"))
    for key, value in first.state_dict.items():
        torch.testing.assert_close(value, second.state_dict[key], rtol=0, atol=0)


def test_offline_imagenet_weights_fail_with_the_file_to_provide(tmp_path, monkeypatch):
    import urllib.error

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"no network in this test ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd\.pth"):
        build_classifier("resnet18", "imagenet")


def test_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="classifier.architecture"):
        from_params(ClassifierConfig, {"architecture": "vit_h_14"}, "classifier")
    with pytest.raises(ConfigError, match="classifier.epochs = 0"):
        from_params(ClassifierConfig, {"epochs": 0}, "classifier")
