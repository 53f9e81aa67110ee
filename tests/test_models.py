"""The detector factory: what trains, anchors and box head as configured, weights that rebuild
the same network without pickle, and a version that names the weights."""

from __future__ import annotations

import traceback
from dataclasses import replace

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from pneumonia_kedro.errors import PneumoniaKedroError, WeightsUnavailableError
from pneumonia_kedro.models import (
    OPACITY_LABEL,
    ModelConfig,
    TrainedModel,
    build_model,
    detect,
    model_config_from_dict,
    model_from_state,
    to_model_input,
    weights_version,
    with_download,
)

SIZE = 64
TINY = ModelConfig(
    architecture="mobilenet_v3_large_fpn", pretrained="none", trainable="all", image_size=SIZE,
    anchor_sizes=((8, 16, 32),) * 3, anchor_ratios=(1.0, 2.0), rpn_pre_nms_top_n_test=50,
    rpn_post_nms_top_n_test=20, box_head_size=32, box_detections_per_img=5,
    box_score_thresh=0.0,
)


def _images(seed: int = 0, count: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, SIZE, SIZE), dtype=torch.uint8,
                         generator=generator)


def test_only_the_box_predictor_trains_when_asked():
    model = build_model(replace(TINY, trainable="box_predictor"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters()
                         if name.startswith("roi_heads.box_predictor.")}
    assert model.roi_heads.box_predictor.cls_score.out_features == 2  # background, opacity


def test_anchors_and_box_head_follow_the_config():
    model = build_model(TINY)
    assert model.rpn.anchor_generator.sizes == ((8, 16, 32),) * 3
    # 3 sizes x 2 ratios per location: the RPN head was rebuilt for 6 anchors.
    assert model.rpn.head.cls_logits.out_channels == 6
    assert model.roi_heads.box_head.fc7.out_features == 32
    # The detector's own resize keeps the cache's size instead of upscaling to 800 px.
    assert model.transform.min_size == (SIZE,) and model.transform.max_size == SIZE


def test_anchor_levels_must_match_the_feature_maps():
    with pytest.raises(PneumoniaKedroError, match="has 2 levels but mobilenet_v3_large_fpn has 3"):
        build_model(replace(TINY, anchor_sizes=((8, 16),) * 2))


def test_resnet18_fpn_has_no_coco_weights():
    with pytest.raises(PneumoniaKedroError, match="resnet18_fpn has no COCO weights"):
        build_model(replace(TINY, architecture="resnet18_fpn", pretrained="coco",
                            anchor_sizes=None))


def test_a_trained_model_rebuilds_to_the_same_predictions():
    torch.manual_seed(0)
    config = replace(TINY, freeze_batchnorm=True)
    model = build_model(config).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    # The saved config (lists, as JSON gives them back) and weights rebuild the network.
    saved = model_config_from_dict({**config.to_dict(),
                                    "anchor_sizes": [[8, 16, 32]] * 3,
                                    "anchor_ratios": [1.0, 2.0]})
    assert saved == config
    rebuilt = TrainedModel(saved, model.state_dict(), info={}).build()
    images = _images()
    cpu = torch.device("cpu")
    for (boxes, scores), (boxes_again, scores_again) in zip(
            detect(model, images, cpu), detect(rebuilt, images, cpu), strict=True):
        torch.testing.assert_close(boxes, boxes_again)
        torch.testing.assert_close(scores, scores_again)


def test_rebuilding_refuses_weights_of_another_shape():
    state = build_model(TINY).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        model_from_state(replace(TINY, box_head_size=16), state)


def test_detect_returns_opacity_boxes_inside_the_image():
    torch.manual_seed(1)
    model = build_model(TINY).eval()
    outputs = detect(model, _images(seed=2, count=3), torch.device("cpu"))
    assert len(outputs) == 3
    for boxes, scores in outputs:
        assert boxes.shape == (len(scores), 4) and boxes.dtype == torch.float32
        assert (boxes >= 0).all() and (boxes <= SIZE).all()
        assert (scores[:-1] >= scores[1:]).all()  # torchvision sorts by score
    assert OPACITY_LABEL == 1


def test_model_input_is_three_channel_float_in_unit_range():
    images = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    (batch,) = to_model_input(images, torch.device("cpu"))
    assert batch.shape == (3, 2, 2) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[2], torch.tensor([[0.0, 1.0], [128 / 255, 64 / 255]]))


def test_weights_version_names_the_weights():
    state = {"a": torch.zeros(2), "b": torch.ones(3)}
    version = weights_version("resnet18_fpn", state)
    assert version.startswith("resnet18_fpn-") and len(version.split("-")[1]) == 12
    assert weights_version("resnet18_fpn", dict(reversed(state.items()))) == version
    changed = {**state, "b": torch.tensor([1.0, 1.0, 1.5])}
    assert weights_version("resnet18_fpn", changed) != version


def test_offline_download_names_the_file_to_provide():
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    weights = FasterRCNN_ResNet50_FPN_Weights.COCO_V1

    def offline():
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    with pytest.raises(WeightsUnavailableError) as caught:
        with_download(offline, weights, "COCO")
    message = str(caught.value)
    assert "COCO weights could not be downloaded" in message
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in message
    assert "model.pretrained" in message


def _same(first: dict, second: dict, names: list[str]) -> bool:
    return all(torch.equal(first[name], second[name]) for name in names)


def test_a_weights_file_of_another_architecture_is_refused_naming_file_key_and_counts(
        tmp_path):
    other = replace(TINY, architecture="resnet18_fpn", anchor_sizes=((8, 16, 32),) * 5)
    torch.save(build_model(other).state_dict(), tmp_path / "resnet18.pth")
    config = replace(TINY, pretrained=str(tmp_path / "resnet18.pth"))
    with pytest.raises(WeightsUnavailableError) as caught:
        build_model(config)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'resnet18.pth'} (model.pretrained) does not fit")
    own = len(build_model(TINY).state_dict())
    assert f"of the network's {own} tensors are in the file's" in message
    assert "of the network's tensors are not in the file (first: 'backbone.body." in message
    assert "model.partial_weights: true" in message


def test_partial_weights_loads_only_what_fits_and_says_so(tmp_path, caplog):
    other = replace(TINY, box_head_size=16)  # the box head differs, the rest fits
    source = build_model(other).state_dict()
    torch.save(source, tmp_path / "narrow_head.pth")
    config = replace(TINY, pretrained=str(tmp_path / "narrow_head.pth"))
    with pytest.raises(WeightsUnavailableError, match=(
            r"324 of the network's 330 tensors are in the file's 330 with the same shape; "
            r"4 have another shape \(first: 'roi_heads.box_head.fc6.weight' is \[16, 12544\] "
            r"in the file, \[32, 12544\] in the network\)")):
        build_model(config)
    with caplog.at_level("WARNING", logger="pneumonia_kedro.pretrained"):
        loaded = build_model(replace(config, partial_weights=True)).state_dict()
    fits = [k for k in loaded if not k.startswith("roi_heads.")]
    assert _same(source, loaded, fits)
    assert not torch.equal(source["roi_heads.box_head.fc7.bias"][:16],
                           loaded["roi_heads.box_head.fc7.bias"][:16])
    assert "model.partial_weights: true" in caplog.text and "loaded only what fits" in caplog.text


def test_a_file_with_another_class_count_fits_its_box_predictor_is_replaced(tmp_path):
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    coco_like = build_model(TINY)
    coco_like.roi_heads.box_predictor = FastRCNNPredictor(32, 91)  # COCO's 91 classes
    torch.save({"state_dict": coco_like.state_dict()}, tmp_path / "coco_like.pth")
    loaded = build_model(replace(TINY, pretrained=str(tmp_path / "coco_like.pth")))
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 2
    body = [k for k in loaded.state_dict() if not k.startswith("roi_heads.box_predictor.")]
    assert _same(coco_like.state_dict(), loaded.state_dict(), body)


def test_a_file_that_is_not_weights_names_file_and_key_without_unsafe_advice(tmp_path):
    pickled = tmp_path / "whole_model.pth"
    torch.save(build_model(TINY), pickled)  # a pickled network, not its state_dict
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    expected = {pickled: "it holds Python objects, not only tensors",
                tmp_path / "notes.pth": "not a PyTorch weights file",
                tmp_path / "list.pth": "not a state_dict"}
    for path, reason in expected.items():
        with pytest.raises(WeightsUnavailableError) as caught:
            build_model(replace(TINY, pretrained=str(path)))
        message = str(caught.value)
        assert message.startswith(f"{path} (model.pretrained): {reason}")
        # Nor is torch's own message (which advises weights_only=False) in the traceback.
        assert "weights_only" not in "".join(traceback.format_exception(caught.value))
    with pytest.raises(WeightsUnavailableError,
                       match=r"missing.pth: weights file not found \(model.pretrained\)"):
        build_model(replace(TINY, pretrained=str(tmp_path / "missing.pth")))


def test_a_run_can_check_the_weights_file_before_its_first_node(tmp_path, monkeypatch):
    from pneumonia_kedro.classifier import ClassifierConfig
    from pneumonia_kedro.classifier import check_weights_file as check_classifier_file
    from pneumonia_kedro.models import check_weights_file

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a check downloads nothing")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    check_weights_file(ModelConfig(architecture="resnet50_fpn", pretrained="coco"))
    check_classifier_file(ClassifierConfig(pretrained="imagenet"))
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsUnavailableError, match=r"other.pth \(model.pretrained\) does "
                                                      r"not fit the FasterRCNN: none of its 1"):
        check_weights_file(replace(TINY, pretrained=str(tmp_path / "other.pth")))
    with pytest.raises(WeightsUnavailableError, match=r"\(classifier.pretrained\) does not fit"):
        check_classifier_file(ClassifierConfig(pretrained=str(tmp_path / "other.pth")))


# Issue 24: more detectors. Each builds, trains, predicts in the image's pixels and reloads.
NEW_ARCHITECTURES = {
    "resnet34_fpn": replace(TINY, architecture="resnet34_fpn", anchor_sizes=((8, 16),) * 5),
    "fcos_resnet18_fpn": replace(TINY, architecture="fcos_resnet18_fpn"),
}


def _two_steps(model: torch.nn.Module) -> list[float]:
    """Two SGD steps on one image with a box and one without: the summed losses."""
    images = to_model_input(_images(seed=3), torch.device("cpu"))
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 34.0, 48.0]]),
                "labels": torch.tensor([OPACITY_LABEL])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    totals = []
    for _ in range(2):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(float(loss.detach()))
    return totals


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(NEW_ARCHITECTURES))
def test_new_architectures_train_predict_and_reload(architecture):
    torch.manual_seed(0)
    config = NEW_ARCHITECTURES[architecture]
    model = build_model(config)
    assert all(torch.isfinite(torch.tensor(_two_steps(model))))
    model.eval()
    images = _images(seed=4, count=2)
    outputs = detect(model, images, torch.device("cpu"))
    assert sum(len(boxes) for boxes, _ in outputs) > 0  # score threshold 0: boxes come back
    for boxes, scores in outputs:
        assert len(boxes) <= config.box_detections_per_img
        assert (boxes >= 0).all() and (boxes <= SIZE).all()
        assert ((scores >= 0) & (scores <= 1)).all()
    saved = model_config_from_dict(config.to_dict())
    rebuilt = TrainedModel(saved, model.state_dict(), info={}).build()
    for (boxes, scores), (again, scores_again) in zip(
            outputs, detect(rebuilt, images, torch.device("cpu")), strict=True):
        torch.testing.assert_close(boxes, again)
        torch.testing.assert_close(scores, scores_again)


def test_fcos_trains_only_its_last_layers_when_asked_and_has_no_coco_weights():
    config = NEW_ARCHITECTURES["fcos_resnet18_fpn"]
    model = build_model(replace(config, trainable="box_predictor"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.classification_head.cls_logits.weight",
                         "head.classification_head.cls_logits.bias",
                         "head.regression_head.bbox_reg.weight",
                         "head.regression_head.bbox_reg.bias",
                         "head.regression_head.bbox_ctrness.weight",
                         "head.regression_head.bbox_ctrness.bias"}
    # One logit: opacity (no background slot competing for the detection cap).
    assert model.head.classification_head.cls_logits.out_channels == 1
    with pytest.raises(PneumoniaKedroError, match="fcos_resnet18_fpn has no COCO weights"):
        build_model(replace(config, pretrained="coco"))


def test_anchor_sizes_scale_with_the_image_size():
    at_128 = replace(TINY, anchor_sizes=((12, 20, 32),) * 3, anchor_reference_size=128)
    assert replace(at_128, image_size=192).scaled_anchor_sizes() == ((18, 30, 48),) * 3
    model = build_model(replace(at_128, image_size=SIZE))  # half of 128
    assert model.rpn.anchor_generator.sizes == ((6, 10, 16),) * 3
    assert replace(at_128, anchor_reference_size=None).scaled_anchor_sizes() == \
        ((12, 20, 32),) * 3
    from pneumonia_kedro.config import ConfigError, from_params

    with pytest.raises(ConfigError, match="anchor_reference_size = 8 is out of range"):
        from_params(ModelConfig, {"anchor_reference_size": 8}, "model")
    with pytest.raises(ConfigError, match="needs at least one anchor size and one ratio"):
        from_params(ModelConfig, {"anchor_ratios": []}, "model")  # crashed in the first batch
    with pytest.raises(ConfigError, match="needs at least one anchor size and one ratio"):
        from_params(ModelConfig, {"anchor_sizes": [[16], []]}, "model")
    with pytest.raises(ConfigError, match="anchor_reference_size is set but model.anchor_sizes"):
        from_params(ModelConfig, {"anchor_reference_size": 128}, "model")
    # Halves round up (Python's round() took 12.5 to 12 and 13.5 to 14).
    halves = replace(TINY, anchor_sizes=((25, 27),), anchor_reference_size=128, image_size=64)
    assert halves.scaled_anchor_sizes() == ((13, 14),)


def test_a_model_config_without_reference_size_saves_as_before_it_existed():
    """Checkpoints fingerprint ``to_dict()``: a new key with its default would have stopped
    every earlier checkpoint from resuming."""
    from pneumonia_kedro.models import model_config_from_dict

    assert "anchor_reference_size" not in TINY.to_dict()
    assert model_config_from_dict(TINY.to_dict()) == TINY
    scaled = replace(TINY, anchor_sizes=((12, 20, 32),) * 3, anchor_reference_size=128)
    assert model_config_from_dict(scaled.to_dict()) == scaled


@pytest.mark.parametrize("pretrained", ["none", "imagenet"])
def test_training_only_the_box_predictor_of_untrained_layers_is_refused(pretrained):
    """FCOS or a ResNet-18/34 FPN from ``none``/``imagenet`` with the base default
    ``trainable: box_predictor`` trained its last layers on top of frozen random ones."""
    from pneumonia_kedro.config import ConfigError

    config = replace(TINY, pretrained=pretrained, trainable="box_predictor")
    with pytest.raises(ConfigError, match=r"params:model.trainable = 'box_predictor' trains "
                                          r"only the last layers.*set model.trainable: all"):
        config.check_training()
    replace(config, trainable="all").check_training()
    replace(config, pretrained="coco").check_training()
    replace(config, trainable=3).check_training()


def test_settings_that_failed_only_when_the_detector_was_built_are_refused_up_front():
    """FCOS with COCO weights, or a ResNet FPN with the demo's 3-level anchors, failed in
    the train node, after the cache and the whole classifier training had run."""
    from pneumonia_kedro.config import ConfigError

    fcos = replace(TINY, architecture="fcos_resnet18_fpn", pretrained="coco")
    with pytest.raises(ConfigError, match="no COCO weights for model.architecture "
                                          "'fcos_resnet18_fpn': use imagenet or none"):
        fcos.check_training()
    replace(fcos, pretrained="none").check_training()  # its anchor settings are ignored
    resnet = replace(TINY, architecture="resnet34_fpn", anchor_sizes=((16, 32, 64, 128),) * 3)
    with pytest.raises(ConfigError, match="anchor_sizes has 3 levels but resnet34_fpn has 5 "
                                          "feature maps: give 5 lists"):
        resnet.check_training()
    replace(resnet, anchor_sizes=None).check_training()
    replace(resnet, anchor_sizes=((16,),) * 5).check_training()
