"""The one prediction function: test-time variants mapped back exactly, their fusion, the
letterbox undone, the classifier's gate, and the same answer however images are grouped."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pneumonia_kedro.boxes import Letterbox
from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.ensemble import Networks
from pneumonia_kedro.fusion import fuse, fuse_variants
from pneumonia_kedro.inference import Square
from pneumonia_kedro.models import OPACITY_LABEL
from pneumonia_kedro.postprocess import GatingConfig, PostprocessConfig
from pneumonia_kedro.prediction import (
    TTAConfig,
    detect_variants,
    mirror_boxes,
    postprocessed,
    predict,
    prediction_settings,
)

SIZE = 64
CPU = torch.device("cpu")
# Every box kept as it is: the post-processing does not hide what the prediction did.
KEEP_ALL = PostprocessConfig(score_threshold=0.0, nms_iou=1.0, max_boxes=100)


class _Resize:
    """Stands in for torchvision's GeneralizedRCNNTransform: records the size it is set to."""

    def __init__(self) -> None:
        self.min_size, self.max_size = (SIZE,), SIZE


class BrightBoxDetector(nn.Module):
    """Boxes the pixels brighter than mid-grey: a detector whose answer is known exactly."""

    def __init__(self, score: float = 0.8) -> None:
        super().__init__()
        self.transform = _Resize()
        self.sizes_seen: list[int] = []
        self.score = score

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        self.sizes_seen.append(self.transform.min_size[0])
        outputs = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]],
                               dtype=torch.float32)
            outputs.append({"boxes": box, "scores": torch.tensor([self.score]),
                            "labels": torch.tensor([OPACITY_LABEL])})
        return outputs


class BrightnessClassifier(nn.Module):
    """An image-level classifier whose logit grows with the image's mean brightness."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.mean(dim=(1, 2, 3)) * 4.0 + 2.0)[:, None]


def _images() -> torch.Tensor:
    images = torch.zeros((2, 1, SIZE, SIZE), dtype=torch.uint8)
    images[0, 0, 10:30, 5:20] = 255  # left of centre: mirroring moves it
    images[1, 0, 40:60, 33:61] = 255
    return images


def _squares() -> list[Square]:
    """The two images of ``_images``, and a 32 x 64 image letterboxed 16 rows down."""
    wide = np.zeros((SIZE, SIZE), dtype=np.uint8)
    wide[16 + 4:16 + 20, 40:58] = 255
    pixels = [*_images()[:, 0].numpy(), wide]
    letterboxes = [Letterbox.fit(SIZE, SIZE, SIZE)] * 2 + [Letterbox.fit(32, 64, SIZE)]
    return [Square(f"p{i}", image, box)
            for i, (image, box) in enumerate(zip(pixels, letterboxes, strict=True))]


def _networks(*detectors: nn.Module, classifiers: int = 0) -> Networks:
    return Networks(list(detectors), [BrightnessClassifier()] * classifiers,
                    [SIZE] * classifiers, CPU)


def test_mirroring_twice_is_the_identity():
    boxes = np.array([[3.0, 4.0, 20.5, 31.0], [0.0, 0.0, 64.0, 64.0]])
    np.testing.assert_array_equal(mirror_boxes(mirror_boxes(boxes, 64), 64), boxes)
    np.testing.assert_array_equal(mirror_boxes(boxes[:1], 64), [[43.5, 4.0, 61.0, 31.0]])


def test_mirrored_predictions_map_back_exactly():
    model = BrightBoxDetector()
    plain, mirrored = detect_variants([model], _images(), CPU, TTAConfig(hflip=True))
    for (boxes, _), (back, _) in zip(plain, mirrored, strict=True):
        np.testing.assert_array_equal(back, boxes)
    np.testing.assert_array_equal(plain[0][0], [[5, 10, 20, 30]])


def test_fusion_of_identical_boxes_returns_them():
    box, score = np.array([[5.0, 10.0, 20.0, 30.0]]), np.array([0.8])
    fused_boxes, fused_scores = fuse([(box, score)] * 3, SIZE, iou=0.55)
    np.testing.assert_allclose(fused_boxes, box, atol=1e-6)
    np.testing.assert_allclose(fused_scores, score, atol=1e-6)


def test_a_box_only_some_variants_found_loses_score_in_proportion():
    one = (np.array([[5.0, 10.0, 20.0, 30.0]]), np.array([0.9]))
    none = (np.zeros((0, 4)), np.zeros(0))
    boxes, scores = fuse([one, none, none], SIZE, iou=0.55)
    np.testing.assert_allclose(boxes, one[0], atol=1e-6)
    np.testing.assert_allclose(scores, [0.3], atol=1e-6)
    assert fuse([none, none], SIZE, iou=0.55)[0].shape == (0, 4)


def test_overlapping_boxes_are_averaged_by_score():
    a = (np.array([[0.0, 0.0, 20.0, 20.0]]), np.array([0.6]))
    b = (np.array([[4.0, 0.0, 24.0, 20.0]]), np.array([0.2]))
    boxes, scores = fuse([a, b], SIZE, iou=0.5)
    np.testing.assert_allclose(boxes, [[1.0, 0.0, 21.0, 20.0]], atol=1e-5)
    np.testing.assert_allclose(scores, [0.4], atol=1e-6)
    # Less overlap than the fusion IoU: two boxes, each at half its score.
    boxes, scores = fuse([a, b], SIZE, iou=0.9)
    assert len(boxes) == 2
    np.testing.assert_allclose(sorted(scores), [0.1, 0.3], atol=1e-6)


def test_every_variant_is_predicted_and_the_fused_box_is_the_plain_one():
    model = BrightBoxDetector()
    tta = TTAConfig(hflip=True, scales=(1.0, 1.5))
    fused = predict(_networks(model, model), _squares(), tta, KEEP_ALL).boxes
    # Two models x two scales x (plain, mirrored), for the one batch.
    assert sorted(model.sizes_seen) == [64] * 4 + [96] * 4
    assert model.transform.min_size == (SIZE,) and model.transform.max_size == SIZE
    plain = predict(_networks(model), _squares(), None, KEEP_ALL).boxes
    assert fused["patientId"].tolist() == plain["patientId"].tolist() == ["p0", "p1", "p2"]
    np.testing.assert_allclose(fused[["x", "y", "width", "height"]],
                               plain[["x", "y", "width", "height"]], atol=1e-4)
    np.testing.assert_allclose(fused["score"], plain["score"], atol=1e-6)


def test_boxes_come_back_in_the_original_pixels_of_a_letterboxed_image():
    prediction = predict(_networks(BrightBoxDetector()), _squares(), None, KEEP_ALL,
                         batch_size=2)
    wide = prediction.boxes.set_index("patientId").loc["p2"]
    # Rows 20-36 of the square are rows 4-20 of the 32-row original.
    assert wide[["x", "y", "width", "height"]].tolist() == [40.0, 4.0, 18.0, 16.0]
    variants = prediction.variants
    assert set(variants["variants"]) == {1} and set(variants["variant"]) == {0}
    assert variants.loc[variants["patientId"] == "p2", ["image_width", "image_height"]] \
        .values.tolist() == [[64, 32]]
    assert prediction.patient_ids == ["p0", "p1", "p2"]
    assert prediction.image_probability.tolist() == pytest.approx([0.8, 0.8, 0.8])


def test_variants_kept_apart_and_fused_later_equal_fused_while_predicting():
    first, second = BrightBoxDetector(0.9), BrightBoxDetector(0.5)
    tta = TTAConfig(hflip=True, scales=(1.0, 1.25), fusion_iou=0.4)
    delivered = predict(_networks(first, second), _squares(), tta, KEEP_ALL)
    apart = predict(_networks(first, second), _squares(), tta, None)
    assert apart.boxes is None and apart.image_probability is None
    assert set(apart.variants["variants"]) == {8}
    pd.testing.assert_frame_equal(apart.variants, delivered.variants)
    later, candidates, probability = postprocessed(apart.variants, tta, KEEP_ALL)
    pd.testing.assert_frame_equal(later, delivered.boxes)
    pd.testing.assert_frame_equal(candidates, delivered.candidates)
    # Each image is fused in its own frame: alone, or in other batches, it gets the same boxes.
    for batch_size in (1, 2):
        again = predict(_networks(first, second), _squares(), tta, KEEP_ALL,
                        batch_size=batch_size)
        pd.testing.assert_frame_equal(again.boxes, delivered.boxes)
    alone = predict(_networks(first, second), _squares()[2:], tta, KEEP_ALL).boxes
    pd.testing.assert_frame_equal(
        alone, delivered.boxes.loc[delivered.boxes["patientId"] == "p2"]
        .reset_index(drop=True))
    # Both models found the box in all four variants: the mean of their scores.
    np.testing.assert_allclose(probability, [0.7, 0.7, 0.7])


def test_the_classifier_s_mean_probability_gates_the_boxes():
    squares = _squares()
    networks = _networks(BrightBoxDetector(), classifiers=2)
    prediction = predict(networks, squares, TTAConfig(hflip=True), KEEP_ALL)
    pixels = torch.from_numpy(np.stack([s.pixels for s in squares]))[:, None]
    np.testing.assert_allclose(prediction.classifier_probability,
                               networks.classify(pixels, hflip=True))
    assert prediction.classifier_probability.index.tolist() == ["p0", "p1", "p2"]
    assert prediction.classifier_probability.index.name == "patientId"
    p = prediction.classifier_probability
    assert p["p1"] > p["p0"] > p["p2"]  # p1 has the most bright pixels
    gate = PostprocessConfig(score_threshold=0.0, gating=GatingConfig(
        "drop_below", threshold=float((p["p0"] + p["p1"]) / 2)))
    gated = predict(networks, squares, TTAConfig(hflip=True), gate)
    assert gated.boxes["patientId"].tolist() == ["p1"]
    assert gated.image_probability.tolist() == pytest.approx([0.0, 0.8, 0.0])
    product = predict(networks, squares, None, PostprocessConfig(
        score_threshold=0.0, gating=GatingConfig("product")))
    np.testing.assert_allclose(product.boxes["score"],
                               0.8 * product.classifier_probability.to_numpy())


def test_no_images_give_empty_tables_and_no_classifier_no_probability():
    prediction = predict(_networks(BrightBoxDetector()), [], TTAConfig(hflip=True), KEEP_ALL)
    assert prediction.boxes.empty and prediction.variants.empty
    assert prediction.patient_ids == [] and prediction.classifier_probability is None
    assert list(prediction.boxes.columns) == ["patientId", "x", "y", "width", "height",
                                              "score"]
    assert fuse_variants(prediction.variants, 0.5).empty


def test_tta_settings_are_checked_and_travel_with_the_post_processing():
    with pytest.raises(ConfigError, match="tta.scales"):
        TTAConfig(scales=())
    with pytest.raises(ConfigError, match="outside"):
        TTAConfig(scales=(1.0, 9.0))
    tta = from_params(TTAConfig, {"hflip": True, "scales": [1.0, 1.25]}, "evaluate.tta")
    assert tta.variants == [(1.0, False), (1.0, True), (1.25, False), (1.25, True)]
    read_tta, post = prediction_settings({"score_threshold": 0.3, "nms_iou": 0.2,
                                          "tta": {"hflip": True, "scales": [1.0, 1.25]}})
    assert read_tta == tta and post.score_threshold == 0.3
    # A postprocessing.json from before TTA was recorded: no variants.
    assert prediction_settings({"score_threshold": 0.3})[0] == TTAConfig()
