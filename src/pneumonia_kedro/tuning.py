"""Post-processing tuned on validation predictions as one search, and reported honestly.

One grid search over the score threshold, the NMS IoU, the box shrink factor, the most boxes
per image and the image-level gating rule maximises the competition metric. A metric tuned and
reported on the same patients flatters the model, so the reported metric is cross-fitted: the
validation patients are split in two halves (seeded, stratified by Target); each half's boxes
are post-processed with the values tuned on the other half. The values delivered to inference
are tuned on all validation patients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pandas as pd

from pneumonia_kedro.config import PROBABILITY, ConfigError, Range
from pneumonia_kedro.fusion import fuse_variants
from pneumonia_kedro.metrics import mean_of_counted, prefix_true_positives, scores_of_prefixes
from pneumonia_kedro.postprocess import (
    GatingConfig,
    PostprocessConfig,
    per_image,
    postprocess,
    shrink_boxes,
)
from pneumonia_kedro.prediction import TTAConfig


@dataclass(frozen=True)
class SearchSpace:
    """The values tried; a one-element list fixes a setting."""

    score_threshold: tuple[float, ...] = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))
    nms_iou: tuple[float, ...] = (0.1, 0.3, 0.5)
    shrink: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 1.0)
    max_boxes: tuple[int, ...] = (2, 3, 4)
    gating_rule: tuple[str, ...] = ("none",)
    gating_threshold: tuple[float, ...] = (0.0,)
    # The IoU at which the TTA variants' (and folds') boxes are fused; empty: tta.fusion_iou.
    fusion_iou: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        checks = {"score_threshold": PROBABILITY, "nms_iou": PROBABILITY,
                  "shrink": Range(0, 2, low_open=True), "max_boxes": Range(1),
                  "gating_threshold": PROBABILITY, "fusion_iou": Range(0, 1, low_open=True)}
        for name, allowed in checks.items():
            values = getattr(self, name)
            if not values and name != "fusion_iou":
                raise ConfigError(f"search.{name} lists no value")
            for value in values:
                if not allowed.contains(value):
                    raise ConfigError(f"search.{name}: {value} is not {allowed}")
        for rule in self.gating_rule:
            if rule not in GatingConfig.RULES:
                raise ConfigError(f"search.gating_rule: {rule!r} is not one of "
                                  f"{list(GatingConfig.RULES)}")

    def size(self) -> int:
        return int(np.prod([max(1, len(getattr(self, f.name)))
                            for f in dataclasses.fields(self)]))


def search(raw: pd.DataFrame, truth: dict[str, np.ndarray], base: PostprocessConfig,
           space: SearchSpace, probabilities: pd.Series | None = None,
           inclusive: bool = False) -> tuple[PostprocessConfig, pd.DataFrame]:
    """The post-processing of ``space`` with the best competition metric on the patients of
    ``truth`` (``xyxy`` boxes per patientId), and the metric of every combination tried.

    ``raw`` rows of other patients are ignored: the search sees only the patients it is given.
    ``probabilities`` are the image-level classifier's, per patientId, for the gating rules.
    """
    ids = list(truth)
    raw = raw.loc[raw["patientId"].isin(set(ids))]
    truth_boxes = [truth[pid] for pid in ids]
    gating_options = [(rule, threshold) for rule in space.gating_rule
                      for threshold in (space.gating_threshold if rule == "drop_below"
                                        else (0.0,))]
    if probabilities is None and any(rule != "none" for rule, _ in gating_options):
        raise ConfigError("gating rules need image-level probabilities (a classifier)")
    image_p = (probabilities.reindex(ids).to_numpy(float) if probabilities is not None
               else np.ones(len(ids)))
    thresholds = np.asarray(space.score_threshold, dtype=np.float64)
    rows = []
    # The score threshold, the cap on boxes and the gating (one factor per image) each keep
    # a prefix of an image's boxes in score order: one matching pass per NMS IoU and shrink.
    for nms_iou in space.nms_iou:
        candidates = postprocess(raw, dataclasses.replace(
            base, nms_iou=nms_iou, max_boxes=max(space.max_boxes), shrink=1.0,
            gating=GatingConfig()), apply_threshold=False)
        for shrink in space.shrink:
            boxes, scores = per_image(shrink_boxes(candidates, shrink), ids)
            tp, n_truth, ordered = prefix_true_positives(truth_boxes, boxes, scores, inclusive)
            for rule, gating_threshold in gating_options:
                gated = _gated_scores(ordered, image_p, rule, gating_threshold)
                kept_by_score = (gated[:, :, None] >= thresholds[None, None, :]).sum(axis=1)
                for max_boxes in space.max_boxes:
                    per_image_scores = scores_of_prefixes(
                        tp, n_truth, np.minimum(kept_by_score, max_boxes))
                    rows.extend(
                        (float(threshold), nms_iou, shrink, max_boxes, rule, gating_threshold,
                         mean_of_counted(per_image_scores[:, j]))
                        for j, threshold in enumerate(thresholds))
    table = pd.DataFrame(rows, columns=["score_threshold", "nms_iou", "shrink", "max_boxes",
                                        "gating_rule", "gating_threshold",
                                        "competition_metric"])
    # The best metric; ties go to the simplest choice (no gating, larger boxes, lower
    # threshold), so a flat optimum does not pick an arbitrary corner.
    ranked = table.assign(_plain=table["gating_rule"] == "none").sort_values(
        ["competition_metric", "_plain", "shrink", "score_threshold"],
        ascending=[False, False, False, True], kind="stable")
    best = ranked.iloc[0]
    chosen = dataclasses.replace(
        base, score_threshold=float(best["score_threshold"]), nms_iou=float(best["nms_iou"]),
        shrink=float(best["shrink"]), max_boxes=int(best["max_boxes"]),
        gating=GatingConfig(rule=str(best["gating_rule"]),
                            threshold=float(best["gating_threshold"])))
    return chosen, table


def search_with_fusion(raw: pd.DataFrame, truth: dict[str, np.ndarray], base: PostprocessConfig,
                       space: SearchSpace, tta: TTAConfig,
                       probabilities: pd.Series | None = None, inclusive: bool = False
                       ) -> tuple[PostprocessConfig, float, pd.DataFrame]:
    """``search`` once per fusion IoU of ``space`` (``tta.fusion_iou`` when it lists none)
    over unfused predictions, fused as ``prediction.predict`` fuses them: the best
    post-processing, its fusion IoU, and every combination tried (``fusion_iou`` column)."""
    best: tuple[PostprocessConfig, float, float] | None = None
    tables = []
    for iou in space.fusion_iou or (tta.fusion_iou,):
        chosen, table = search(fuse_variants(raw, iou, tta.skip_score), truth, base, space,
                               probabilities, inclusive)
        metric = float(table["competition_metric"].max())
        if best is None or metric > best[2]:  # ties keep the earlier (listed first) IoU
            best = (chosen, float(iou), metric)
        tables.append(table.assign(fusion_iou=float(iou)))
    return best[0], best[1], pd.concat(tables, ignore_index=True)


def _gated_scores(ordered: np.ndarray, image_p: np.ndarray, rule: str, threshold: float
                  ) -> np.ndarray:
    """Padded box scores (N, P; -inf padding) as ``postprocess.gate`` changes them."""
    if rule == "product":
        return ordered * image_p[:, None]
    if rule == "geometric":
        return np.sqrt(np.where(np.isfinite(ordered), ordered, 0.0) * image_p[:, None]) \
            + np.where(np.isfinite(ordered), 0.0, -np.inf)
    if rule == "drop_below":
        return np.where((image_p >= threshold)[:, None], ordered, -np.inf)
    return ordered


def halves(patients: pd.DataFrame, seed: int) -> list[np.ndarray]:
    """Two disjoint halves of the patients' ids, each with about half the positives."""
    rng = np.random.default_rng(seed)
    first = []
    for _, group in patients.groupby("Target", sort=True):
        ids = group["patientId"].to_numpy()
        first.extend(rng.permutation(ids)[: len(ids) // 2])
    in_first = patients["patientId"].isin(set(first)).to_numpy()
    return [patients["patientId"].to_numpy()[in_first], patients["patientId"].to_numpy()[~in_first]]


Tuned = TypeVar("Tuned")


def cross_fit(patients: pd.DataFrame, tune: Callable[[Sequence[str]], Tuned], seed: int = 0
              ) -> list[tuple[np.ndarray, Tuned]]:
    """(patients reported, the post-processing tuned without them) for each half."""
    first, second = halves(patients, seed)
    return [(second, tune(first)), (first, tune(second))]
