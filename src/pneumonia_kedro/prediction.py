"""One way to predict: model(s), test-time augmentation and box fusion.

The per-epoch validation, evaluation, inference and the served MLflow model all call
``predict_batch``, so a setting means the same everywhere. Boxes come back ``xyxy`` in the
pixels of the images given (the letterboxed cache squares); ``inference.detect_original``
maps them to the original DICOM pixels.

Test-time variants (the mirrored image, other scales) and several models are fused with
weighted boxes fusion (Solovyev et al., the ``ensemble-boxes`` package): a box found by only
some variants keeps its place but loses score in proportion, where concatenating then NMS
kept the single most confident variant's box and score.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pneumonia_kedro.boxes import xywh_to_xyxy, xyxy_to_xywh
from pneumonia_kedro.config import PROBABILITY, ConfigError, Range, from_params
from pneumonia_kedro.models import detect
from pneumonia_kedro.postprocess import PostprocessConfig, predictions_table


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation: the variants each image is predicted in, and their fusion."""

    RANGES = {"fusion_iou": PROBABILITY, "skip_score": PROBABILITY}

    hflip: bool = False
    scales: tuple[float, ...] = (1.0,)  # e.g. [1.0, 1.25]: the detector resizes internally
    fusion_iou: float = 0.55  # boxes of different variants overlapping more are one box
    skip_score: float = 0.0  # variant boxes scoring lower are left out of the fusion

    def __post_init__(self) -> None:
        scale_range = Range(0.25, 4)
        if not self.scales:
            raise ConfigError("tta.scales must list at least one scale (1.0: as cached)")
        for scale in self.scales:
            if not scale_range.contains(scale):
                raise ConfigError(f"tta.scales: {scale} is outside {scale_range}")

    @property
    def variants(self) -> list[tuple[float, bool]]:
        """(scale, mirrored) of every prediction made per image and model."""
        flips = (False, True) if self.hflip else (False,)
        return [(float(scale), flip) for scale in self.scales for flip in flips]


def prediction_settings(postprocessing: Mapping) -> tuple[TTAConfig, PostprocessConfig]:
    """The test-time augmentation and post-processing that a ``postprocessing.json`` (the
    evaluation's tuned choice) holds; the TTA is the one its raw predictions were made with."""
    values = dict(postprocessing)
    tta = values.pop("tta", {})
    return (from_params(TTAConfig, tta, "postprocessing.tta"),
            from_params(PostprocessConfig, values, "postprocessing"))


def mirror_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """``xyxy`` boxes of a horizontally mirrored image of ``width`` pixels, mirrored back."""
    mirrored = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
    mirrored[:, [0, 2]] = width - mirrored[:, [2, 0]]
    return mirrored


def fuse(predictions: Sequence[tuple[np.ndarray, np.ndarray]], size: float, iou: float,
         skip_score: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Weighted boxes fusion of one image's predictions by several variants or models.

    ``predictions``: (``xyxy`` boxes in pixels of a ``size`` square, scores) per variant.
    A box that every variant found keeps its mean score; one found by k of n variants gets
    k/n of it.
    """
    if not any(len(scores) for _, scores in predictions):
        return np.zeros((0, 4)), np.zeros(0)
    # Imported here: it brings numba, which a run without fusion (and the GPU check) skips.
    from ensemble_boxes import weighted_boxes_fusion

    boxes = [np.clip(np.asarray(b, np.float64).reshape(-1, 4) / size, 0.0, 1.0)
             for b, _ in predictions]
    scores = [np.asarray(s, np.float64) for _, s in predictions]
    fused, fused_scores, _ = weighted_boxes_fusion(
        boxes, scores, [np.zeros(len(s)) for s in scores], iou_thr=iou,
        skip_box_thr=skip_score)
    order = np.argsort(-fused_scores, kind="stable")
    return fused[order] * size, fused_scores[order]


@contextmanager
def _scaled(model: torch.nn.Module, scale: float) -> Iterator[None]:
    """The detector's own resize set to ``scale`` times its size; boxes still come back in
    the input's pixels."""
    transform = getattr(model, "transform", None)
    if scale == 1.0 or transform is None:
        yield
        return
    min_size, max_size = transform.min_size, transform.max_size
    transform.min_size = tuple(round(s * scale) for s in min_size)
    transform.max_size = round(max_size * scale)
    try:
        yield
    finally:
        transform.min_size, transform.max_size = min_size, max_size


@torch.inference_mode()
def predict_variants(models: Sequence[torch.nn.Module], images: torch.Tensor,
                     device: torch.device, tta: TTAConfig | None = None
                     ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per model and TTA variant (a run), per image of a uint8 (B, 1, S, S) batch: ``xyxy``
    boxes in the pixels of ``images`` and scores, not fused."""
    tta = tta or TTAConfig()
    size = images.shape[-1]
    runs: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for model in models:
        model.eval()
        for scale, mirrored in tta.variants:
            with _scaled(model, scale):
                outputs = detect(model, images.flip(-1) if mirrored else images, device)
            runs.append([(mirror_boxes(boxes.numpy(), size) if mirrored
                          else boxes.numpy().astype(np.float64), scores.numpy())
                         for boxes, scores in outputs])
    return runs


def predict_batch(models: Sequence[torch.nn.Module], images: torch.Tensor,
                  device: torch.device, tta: TTAConfig | None = None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``xyxy`` boxes (pixels of ``images``) and scores per image of a uint8 (B, 1, S, S)
    batch, from every model in every TTA variant, fused when there is more than one."""
    tta = tta or TTAConfig()
    runs = predict_variants(models, images, device, tta)
    if len(runs) == 1:
        return runs[0]
    return [fuse([run[i] for run in runs], images.shape[-1], tta.fusion_iou, tta.skip_score)
            for i in range(len(images))]


def fuse_variants(raw: pd.DataFrame, iou: float, skip_score: float = 0.0) -> pd.DataFrame:
    """A table of unfused predictions (``variant`` of ``variants`` runs per row, boxes not yet
    clipped to their ``image_width`` x ``image_height``, as ``inference.predict_cache(
    fused=False)`` writes it) fused per image and clipped, as ``predict_batch`` and
    ``predict_cache`` do it; a table without variants is returned as it is.

    Weighted boxes fusion is unchanged by the letterbox (a shift and a scale per axis), so
    fusing in original pixels equals fusing in the cache's.
    """
    if "variant" not in raw:
        return raw
    runs = int(raw["variants"].max()) if len(raw) else 1
    xyxy = xywh_to_xyxy(raw[["x", "y", "width", "height"]].to_numpy(float))
    if runs > 1:
        # Shifted and scaled into [0, 1] as a whole: fusion sees the boxes undistorted.
        low = float(min(0.0, xyxy.min()))
        size = float(max(1.0, xyxy.max() - low))
        ids, fused_boxes, fused_scores = [], [], []
        scores, variant = raw["score"].to_numpy(float), raw["variant"].to_numpy(int)
        for patient_id, rows in raw.groupby("patientId", sort=False).indices.items():
            boxes, image_scores = fuse([(xyxy[rows][variant[rows] == v] - low,
                                         scores[rows][variant[rows] == v])
                                        for v in range(runs)], size, iou, skip_score)
            ids += [patient_id] * len(image_scores)
            fused_boxes.append(boxes + low)
            fused_scores.append(image_scores)
        xyxy = np.concatenate(fused_boxes) if fused_boxes else np.zeros((0, 4))
        scores = np.concatenate(fused_scores) if fused_scores else np.zeros(0)
    else:
        ids, scores = raw["patientId"].tolist(), raw["score"].to_numpy(float)
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).copy()
    if "image_width" in raw:
        bounds = raw.groupby("patientId")[["image_width", "image_height"]].first()
        width = bounds["image_width"].reindex(ids).to_numpy(float)[:, None]
        height = bounds["image_height"].reindex(ids).to_numpy(float)[:, None]
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
    if not ids:
        return predictions_table([], [], [])
    box = xyxy_to_xywh(xyxy)
    return pd.DataFrame({"patientId": ids, "x": box[:, 0], "y": box[:, 1],
                         "width": box[:, 2], "height": box[:, 3], "score": scores})
