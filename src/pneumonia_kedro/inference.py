"""The images a prediction runs over: letterboxed uint8 squares, each with its id and the
geometry that maps its boxes back to the original image's pixels.

They come from an image cache (``cached_squares``: evaluation, inference, the report) or from
DICOM files decoded one request at a time (the served model); ``prediction.predict`` takes
either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pneumonia_kedro.boxes import Letterbox
from pneumonia_kedro.imagecache import ImageCache


@dataclass(frozen=True)
class Square:
    """One image as the models see it: uint8 (S, S), named by ``key`` (a patientId, or a
    request row); ``letterbox`` None where boxes stay in the square's pixels (training)."""

    key: str
    pixels: np.ndarray
    letterbox: Letterbox | None = None


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

    def squares(self) -> list[Square]:
        """Every image as a ``Square``; the pixels are read from the cache when batched."""
        images = self.cache.images
        return [Square(record["patientId"], images[record["row"]],
                       self.cache.letterbox_from_record(record)) for record in self.records]


def cached_squares(cache: ImageCache, patient_ids: list[str] | None = None) -> list[Square]:
    """The usable images of ``cache`` (of ``patient_ids`` only, when given), in index order."""
    return CachedImages(cache, patient_ids).squares()
