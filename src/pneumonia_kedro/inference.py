"""Running a trained detector over cached images, back in original pixel coordinates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pneumonia_kedro.boxes import Letterbox, xyxy_to_xywh
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.postprocess import (
    PostprocessConfig,
    image_probabilities,
    postprocess,
    predictions_table,
)
from pneumonia_kedro.prediction import TTAConfig, predict_batch, predict_variants


class CachedImages(Dataset):
    """The usable images of a cache, uint8 (1, S, S), in index order."""

    def __init__(self, cache: ImageCache, patient_ids: list[str] | None = None) -> None:
        usable = cache.usable
        if patient_ids is not None:
            usable = usable.loc[usable["patientId"].isin(set(patient_ids))]
        self.cache = cache
        self.records = usable.to_dict("records")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> torch.Tensor:
        row = self.records[index]["row"]
        return torch.from_numpy(np.array(self.cache.images[row], copy=True))[None]


def _in_original_pixels(run: list[tuple[np.ndarray, np.ndarray]], letterboxes: list[Letterbox],
                        clip: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cache-pixel ``xyxy`` boxes per image as ``xywh`` in the original pixels, scores kept."""
    return [(xyxy_to_xywh(letterbox.to_original(boxes, clip=clip)), scores)
            for (boxes, scores), letterbox in zip(run, letterboxes, strict=True)]


def detect_original(models: Sequence[torch.nn.Module], images: torch.Tensor,
                    letterboxes: list[Letterbox], device: torch.device,
                    tta: TTAConfig | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``xywh`` boxes in each image's original pixels, and their scores, for a batch of
    uint8 letterboxed squares (B, 1, S, S): ``predict_batch``, then the letterbox undone."""
    return _in_original_pixels(predict_batch(models, images, device, tta), letterboxes)


def predict_cache(models: Sequence[torch.nn.Module], cache: ImageCache, device: torch.device,
                  batch_size: int = 16, tta: TTAConfig | None = None, progress: bool = True,
                  patient_ids: list[str] | None = None, desc: str = "predicting",
                  fused: bool = True) -> pd.DataFrame:
    """Raw predictions (every box the model keeps) as a long table in original pixels.

    ``fused=False`` keeps every model's and TTA variant's boxes apart (columns ``variant``
    and ``variants``), for ``prediction.fuse_variants`` to fuse at any fusion IoU.
    """
    data = CachedImages(cache, patient_ids)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    tables = []
    for start, images in zip(range(0, len(data), batch_size),
                             tqdm(loader, desc=desc, unit="batch", disable=not progress),
                             strict=True):
        records = data.records[start:start + len(images)]
        ids = [record["patientId"] for record in records]
        letterboxes = [cache.letterbox_from_record(record) for record in records]
        if fused:
            runs = [predict_batch(models, images, device, tta)]
        else:
            runs = predict_variants(models, images, device, tta)
            widths = {pid: lb.width for pid, lb in zip(ids, letterboxes, strict=True)}
            heights = {pid: lb.height for pid, lb in zip(ids, letterboxes, strict=True)}
        for variant, run in enumerate(runs):
            # Kept apart, boxes are not clipped to the image yet: fusion comes first.
            mapped = _in_original_pixels(run, letterboxes, clip=fused)
            table = predictions_table(ids, [boxes for boxes, _ in mapped],
                                      [scores for _, scores in mapped])
            if not fused:
                table = table.assign(variant=variant, variants=len(runs),
                                     image_width=table["patientId"].map(widths),
                                     image_height=table["patientId"].map(heights))
            tables.append(table)
    if not tables:
        table = predictions_table([], [], [])
        return table if fused else table.assign(variant=0, variants=1, image_width=0,
                                                image_height=0)
    return pd.concat(tables, ignore_index=True)


def finalize(raw: pd.DataFrame, config: PostprocessConfig, patient_ids: list[str],
             classifier_probabilities: pd.Series | None = None
             ) -> tuple[pd.DataFrame, pd.Series]:
    """The delivered boxes (post-processed, gated by the classifier's probabilities,
    ``label_shift`` applied), and each image's opacity probability (the highest gated
    candidate score, before the score threshold), indexed by ``patient_ids``."""
    candidates = postprocess(raw, config, apply_threshold=False,
                             probabilities=classifier_probabilities)
    probabilities = pd.Series(image_probabilities(candidates, patient_ids), index=patient_ids)
    return postprocess(raw, config, probabilities=classifier_probabilities,
                       apply_label_shift=True), probabilities
