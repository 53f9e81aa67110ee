"""Running a trained detector over cached images, back in original pixel coordinates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pneumonia_kedro.boxes import xyxy_to_xywh
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.models import detect
from pneumonia_kedro.postprocess import predictions_table


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


@torch.inference_mode()
def predict_cache(model: torch.nn.Module, cache: ImageCache, device: torch.device,
                  batch_size: int = 16, hflip_tta: bool = False, progress: bool = True,
                  patient_ids: list[str] | None = None, desc: str = "predicting"
                  ) -> pd.DataFrame:
    """Raw predictions (every box the model keeps) as a long table in original pixels.

    With ``hflip_tta`` the mirrored image is predicted too and its boxes, mirrored back, are
    added; post-processing NMS then merges the two sets.
    """
    model.eval()
    data = CachedImages(cache, patient_ids)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    size = cache.image_size
    ids, boxes, scores = [], [], []
    position = 0
    for images in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        results = detect(model, images, device)
        if hflip_tta:
            flipped = detect(model, images.flip(-1), device)
            merged = []
            for (b, s), (fb, fs) in zip(results, flipped, strict=True):
                unflipped = fb.clone()
                unflipped[:, [0, 2]] = size - fb[:, [2, 0]]
                merged.append((torch.cat([b, unflipped]), torch.cat([s, fs])))
            results = merged
        for box, score in results:
            record = data.records[position]
            position += 1
            letterbox = cache.letterbox_from_record(record)
            ids.append(record["patientId"])
            boxes.append(xyxy_to_xywh(letterbox.to_original(box.numpy())))
            scores.append(score.numpy())
    return predictions_table(ids, boxes, scores)
