"""One way to predict: images and an ensemble in, fused, gated, post-processed boxes out.

``predict`` is the one prediction path. The inference node, the served MLflow model and
evaluation call it; evaluation keeps every model's and test-time variant's boxes apart
(``postprocess=None``) for the search to fuse at each fusion IoU (``fusion.fuse_variants``,
the one fusion), and scores them finished by ``postprocessed``, the second half of
``predict``. Training's per-epoch validation runs the same batches (``predict_batches``) in
the cache's pixels.

Per batch of letterboxed squares: every detector in every test-time variant (the mirrored
image, other scales), mapped back to the original image's pixels, and the image-level
classifiers' mean probability. Then the variants are fused per image (``fusion``), gated by
that probability and post-processed (``postprocess``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pneumonia_kedro.boxes import xyxy_to_xywh
from pneumonia_kedro.config import PROBABILITY, ConfigError, Range, from_params
from pneumonia_kedro.ensemble import Networks
from pneumonia_kedro.fusion import fuse_variants
from pneumonia_kedro.inference import Square
from pneumonia_kedro.models import detect
from pneumonia_kedro.postprocess import (
    PostprocessConfig,
    image_probabilities,
    postprocess,
    predictions_table,
)

Boxes = list[tuple[np.ndarray, np.ndarray]]  # (xyxy boxes, scores) per image


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
    values.pop("models", None)  # the models it was tuned for: inference checks them
    return (from_params(TTAConfig, tta, "postprocessing.tta"),
            from_params(PostprocessConfig, values, "postprocessing"))


def mirror_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """``xyxy`` boxes of a horizontally mirrored image of ``width`` pixels, mirrored back."""
    mirrored = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
    mirrored[:, [0, 2]] = width - mirrored[:, [2, 0]]
    return mirrored


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
def detect_variants(models: list[torch.nn.Module], images: torch.Tensor,
                    device: torch.device, tta: TTAConfig) -> list[Boxes]:
    """Per model and TTA variant (a run), per image of a uint8 (B, 1, S, S) batch: ``xyxy``
    boxes in the pixels of ``images`` and scores, not fused."""
    size = images.shape[-1]
    runs: list[Boxes] = []
    for model in models:
        model.eval()
        for scale, mirrored in tta.variants:
            with _scaled(model, scale):
                outputs = detect(model, images.flip(-1) if mirrored else images, device)
            runs.append([(mirror_boxes(boxes.numpy(), size) if mirrored
                          else boxes.numpy().astype(np.float64), scores.numpy())
                         for boxes, scores in outputs])
    return runs


def predict_batches(networks: Networks, images: Iterable[Square], tta: TTAConfig,
                    batch_size: int = 16, progress: bool = False, desc: str = "predicting"
                    ) -> Iterator[tuple[list[Square], list[Boxes], np.ndarray | None]]:
    """The one batching loop: per batch of ``images``, the squares, the detectors' boxes per
    run (``detect_variants``, in the squares' pixels) and the classifiers' mean probability
    per image (None without classifiers)."""
    total = -(-len(images) // batch_size) if hasattr(images, "__len__") else None
    iterator = iter(images)
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress) as bar:
        while batch := list(itertools.islice(iterator, batch_size)):
            # uint8 until the device: the models convert there.
            pixels = torch.from_numpy(np.stack([square.pixels for square in batch]))[:, None]
            runs = detect_variants(networks.detectors, pixels, networks.device, tta) \
                if networks.detectors else []
            probabilities = networks.classify(pixels, tta.hflip) if networks.classifiers \
                else None
            yield batch, runs, probabilities
            bar.update()


def _variant_tables(batch: list[Square], runs: list[Boxes]) -> list[pd.DataFrame]:
    """One table per run: ``xywh`` boxes in the original pixels, not clipped (fusion comes
    first), with the run's ``variant`` of ``variants`` and each image's size."""
    ids = [square.key for square in batch]
    widths = {square.key: square.letterbox.width for square in batch}
    heights = {square.key: square.letterbox.height for square in batch}
    tables = []
    for variant, run in enumerate(runs):
        boxes = [xyxy_to_xywh(square.letterbox.to_original(image_boxes, clip=False))
                 for square, (image_boxes, _) in zip(batch, run, strict=True)]
        table = predictions_table(ids, boxes, [scores for _, scores in run])
        tables.append(table.assign(variant=variant, variants=len(runs),
                                   image_width=table["patientId"].map(widths),
                                   image_height=table["patientId"].map(heights)))
    return tables


@dataclass
class Prediction:
    """What ``predict`` found, per image of its input (``patient_ids``, in input order).

    ``variants``: every box of every detector and TTA variant in original pixels, not fused
    (the raw validation predictions). With a post-processing: ``boxes``, the delivered boxes
    (fused, gated, post-processed, ``label_shift`` applied); ``candidates``, the same before
    the score threshold and the label shift; ``image_probability``, the highest candidate
    score per image (0 without one).
    """

    patient_ids: list[str]
    variants: pd.DataFrame
    classifier_probability: pd.Series | None = None
    boxes: pd.DataFrame | None = None
    candidates: pd.DataFrame | None = None
    image_probability: pd.Series | None = None


def postprocessed(variants: pd.DataFrame, tta: TTAConfig, config: PostprocessConfig,
                  classifier_probability: pd.Series | None = None,
                  patient_ids: list[str] | None = None, label_shift: bool = True
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Unfused boxes (``Prediction.variants``) fused at ``tta.fusion_iou``, gated by the
    classifier's probabilities and post-processed: (boxes, candidates, image probability
    per patient of ``patient_ids``, by default those with a box). ``label_shift=False`` for
    evaluation, which scores boxes as the labels draw them."""
    fused = fuse_variants(variants, tta.fusion_iou, tta.skip_score)
    candidates = postprocess(fused, config, apply_threshold=False,
                             probabilities=classifier_probability)
    boxes = postprocess(fused, config, probabilities=classifier_probability,
                        apply_label_shift=label_shift)
    ids = list(dict.fromkeys(variants["patientId"])) if patient_ids is None else patient_ids
    return boxes, candidates, pd.Series(image_probabilities(candidates, ids), index=ids)


def predict(networks: Networks, images: Iterable[Square], tta: TTAConfig | None = None,
            postprocess: PostprocessConfig | None = None, batch_size: int = 16,
            progress: bool = False, desc: str = "predicting") -> Prediction:
    """Boxes in the original pixels of each image of ``images`` (letterboxed squares, e.g.
    ``inference.cached_squares``), and the classifiers' mean probability per image.

    Without ``postprocess`` every detector's and TTA variant's boxes are kept apart
    (``variants``), for tuning; with it they are fused, gated and post-processed too.
    """
    tta = tta or TTAConfig()
    ids, tables, probabilities = [], [], []
    for batch, runs, batch_probabilities in predict_batches(networks, images, tta, batch_size,
                                                            progress, desc):
        ids += [square.key for square in batch]
        tables += _variant_tables(batch, runs)
        if batch_probabilities is not None:
            probabilities.append(batch_probabilities)
    variants = pd.concat(tables, ignore_index=True) if tables else \
        predictions_table([], [], []).assign(variant=0, variants=1, image_width=0,
                                             image_height=0)
    classifier_p = pd.Series(np.concatenate(probabilities) if probabilities else np.zeros(0),
                             index=pd.Index(ids, name="patientId"), name="probability") \
        if networks.classifiers else None
    prediction = Prediction(ids, variants, classifier_p)
    if postprocess is not None:
        prediction.boxes, prediction.candidates, prediction.image_probability = postprocessed(
            variants, tta, postprocess, classifier_p, ids)
    return prediction
