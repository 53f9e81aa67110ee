"""The one prediction function: test-time variants mapped back exactly, and their fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.models import OPACITY_LABEL
from pneumonia_kedro.prediction import (
    TTAConfig,
    fuse,
    mirror_boxes,
    predict_batch,
    prediction_settings,
)

SIZE = 64


class _Resize:
    """Stands in for torchvision's GeneralizedRCNNTransform: records the size it is set to."""

    def __init__(self) -> None:
        self.min_size, self.max_size = (SIZE,), SIZE


class BrightBoxDetector(nn.Module):
    """Boxes the pixels brighter than mid-grey: a detector whose answer is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.transform = _Resize()
        self.sizes_seen: list[int] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        self.sizes_seen.append(self.transform.min_size[0])
        outputs = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]],
                               dtype=torch.float32)
            outputs.append({"boxes": box, "scores": torch.tensor([0.8]),
                            "labels": torch.tensor([OPACITY_LABEL])})
        return outputs


def _images() -> torch.Tensor:
    images = torch.zeros((2, 1, SIZE, SIZE), dtype=torch.uint8)
    images[0, 0, 10:30, 5:20] = 255  # left of centre: mirroring moves it
    images[1, 0, 40:60, 33:61] = 255
    return images


def test_mirroring_twice_is_the_identity():
    boxes = np.array([[3.0, 4.0, 20.5, 31.0], [0.0, 0.0, 64.0, 64.0]])
    np.testing.assert_array_equal(mirror_boxes(mirror_boxes(boxes, 64), 64), boxes)
    np.testing.assert_array_equal(mirror_boxes(boxes[:1], 64), [[43.5, 4.0, 61.0, 31.0]])


def test_mirrored_predictions_map_back_exactly():
    model = BrightBoxDetector()
    plain = predict_batch([model], _images(), torch.device("cpu"))
    mirrored_only = [(mirror_boxes(b, SIZE), s) for b, s in
                     predict_batch([model], _images().flip(-1), torch.device("cpu"))]
    for (boxes, _), (back, _) in zip(plain, mirrored_only, strict=True):
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
    fused = predict_batch([model, model], _images(), torch.device("cpu"), tta)
    # Two models x two scales x (plain, mirrored).
    assert sorted(model.sizes_seen) == [64, 64, 64, 64, 96, 96, 96, 96]
    assert model.transform.min_size == (SIZE,) and model.transform.max_size == SIZE
    plain = predict_batch([model], _images(), torch.device("cpu"))
    for (boxes, scores), (expected, expected_scores) in zip(fused, plain, strict=True):
        np.testing.assert_allclose(boxes, expected, atol=1e-4)
        np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


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
