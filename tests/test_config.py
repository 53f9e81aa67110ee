"""Typed parameters: every number has a range, every choice lists its values, and both are
checked before a node touches data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from pneumonia_kedro.config import ConfigError, Range, from_params
from pneumonia_kedro.imagecache import CacheConfig
from pneumonia_kedro.models import ModelConfig
from pneumonia_kedro.postprocess import PostprocessConfig
from pneumonia_kedro.settings import CONFIG_LOADER_ARGS
from pneumonia_kedro.split import SplitConfig
from pneumonia_kedro.training import TrainConfig


@pytest.mark.parametrize(("cls", "group", "params", "message"), [
    (TrainConfig, "train", {"epochs": 0}, "params:train.epochs = 0 is out of range: it must "
                                          "be >= 1"),
    (TrainConfig, "train", {"batch_size": 0}, "params:train.batch_size = 0 is out of range"),
    (TrainConfig, "train", {"learning_rate": 0.0}, "learning_rate = 0.0 is out of range: it "
                                                   "must be > 0"),
    (TrainConfig, "train", {"augment": {"horizontal_flip": 1.5}},
     "params:train.augment.horizontal_flip = 1.5 is out of range: it must be >= 0 and <= 1"),
    (CacheConfig, "cache", {"image_size": -1}, "params:cache.image_size = -1 is out of range: "
                                               "it must be >= 16"),
    (CacheConfig, "cache", {"chunk_size": 0}, "params:cache.chunk_size = 0"),
    (SplitConfig, "split", {"validation_fraction": 1.0}, "validation_fraction = 1.0 is out of "
                                                         "range: it must be > 0 and < 1"),
    (PostprocessConfig, "evaluate.postprocess", {"nms_iou": 2}, "nms_iou = 2 is out of range"),
])
def test_numbers_out_of_range_name_the_key(cls, group, params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_params(cls, params, group)


def test_a_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError, match="params:model.architecture = 'resnet' .* allowed "
                                          "values: 'resnet50_fpn', ") as info:
        from_params(ModelConfig, {"architecture": "resnet"}, "model")
    assert "'mobilenet_v3_large_fpn'" in str(info.value)


def test_values_in_range_and_optional_numbers_pass():
    config = from_params(TrainConfig, {"epochs": 1, "score_threshold": None,
                                       "grad_clip_norm": None}, "train")
    assert config.epochs == 1 and config.score_threshold is None
    assert from_params(SplitConfig, {"n_per_class": None}, "split").n_per_class is None


def test_range_bounds():
    assert Range(0, 1).contains(0) and Range(0, 1).contains(1)
    assert not Range(0, 1, low_open=True).contains(0)
    assert not Range(0, 1, high_open=True).contains(1)
    assert str(Range(0, 1, low_open=True)) == "> 0 and <= 1"


@pytest.mark.parametrize("env", ["base", "demo", "gpu"])
def test_every_environment_s_parameters_are_valid(env):
    """Each shipped environment (base: the notebook's knobs; demo: CPU-sized; gpu: the
    winners' recipe) builds every parameter group without an error."""
    from pneumonia_kedro.classifier import ClassifierConfig
    from pneumonia_kedro.demo import DemoConfig
    from pneumonia_kedro.pipelines.evaluate.nodes import EvaluateConfig, ServingConfig
    from pneumonia_kedro.pipelines.inference.nodes import InferenceConfig
    from pneumonia_kedro.pipelines.ingest.nodes import IngestConfig

    loader = OmegaConfigLoader(str(Path(__file__).parents[1] / "conf"),
                               **{**CONFIG_LOADER_ARGS, "default_run_env": env})
    params = loader["parameters"]
    groups = {"demo_data": DemoConfig, "ingest": IngestConfig, "split": SplitConfig,
              "cache": CacheConfig, "model": ModelConfig, "train": TrainConfig,
              "classifier": ClassifierConfig, "evaluate": EvaluateConfig,
              "serving": ServingConfig, "inference": InferenceConfig}
    assert set(groups) <= set(params)
    built = {name: from_params(cls, params[name], name) for name, cls in groups.items()}
    built["model"].check_training()  # anchors fit the detector's feature maps, and so on
    if env == "gpu":
        assert built["model"].trainable == "all" and built["model"].pretrained == "coco"
        assert built["cache"].image_size == 1024 and built["evaluate"].tta.hflip
        assert built["classifier"].pretrained == "imagenet"
    if env == "demo":
        assert built["classifier"].pretrained == "none" and built["model"].pretrained == "none"


def test_every_benchmark_recipe_builds_a_trainable_detector_on_conf_demo():
    """benchmarks/recipes.py's overrides, merged onto conf/demo as --params merges them."""
    root = Path(__file__).parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from recipes import RECIPES, merged
    finally:
        sys.path.remove(str(root / "benchmarks"))
    params = OmegaConfigLoader(str(root / "conf"),
                               **{**CONFIG_LOADER_ARGS, "default_run_env": "demo"})["parameters"]
    for name, recipe in RECIPES.items():
        settings = merged(params, recipe)
        model = from_params(ModelConfig, settings["model"], "model")
        model.check_training()
        assert from_params(TrainConfig, settings["train"], "train").epochs >= 1, name
    assert merged(params, RECIPES["resnet18_fpn@128, 5 epochs"]) == merged(params, {}), \
        "conf/demo is the recipe the benchmarks README names as the demo's"
