"""The training data side: patients read from the image cache, augmentation, batches.

Images stay uint8 until the device, where ``to_model_input`` converts and normalises them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from pneumonia_kedro.boxes import xywh_to_xyxy
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.labels import boxes_array
from pneumonia_kedro.models import OPACITY_LABEL
from pneumonia_kedro.training.config import AugmentConfig

logger = logging.getLogger(__name__)


def _augmentation(config: AugmentConfig) -> v2.Compose:
    return v2.Compose([
        v2.RandomHorizontalFlip(config.horizontal_flip),
        v2.RandomAffine(degrees=0, translate=(config.translate, config.translate),
                        scale=tuple(config.scale)),
        v2.ColorJitter(brightness=config.brightness, contrast=config.contrast),
        v2.SanitizeBoundingBoxes(min_size=2),
    ])


class CachedDetectionDataset(Dataset):
    """Patients of a split read from the image cache, with boxes in cache ``xyxy``.

    Negatives have empty targets (shape (0, 4)); ``negative_boxes="whole_image"`` instead gives
    them one whole-image opacity box, as the notebook did (harmful: kept for comparison).
    """

    def __init__(self, cache: ImageCache, patients: pd.DataFrame,
                 negative_boxes: str = "empty", augment: AugmentConfig | None = None) -> None:
        usable = cache.usable
        table = usable.merge(patients.loc[:, ["patientId", "boxes"]], on="patientId",
                             how="inner")
        dropped = len(patients) - len(table)
        if dropped:
            logger.warning("%d patient(s) are not in the image cache (skipped files); "
                           "training without them", dropped)
        self.cache = cache
        self.size = cache.image_size
        self.patient_ids = table["patientId"].tolist()
        self.rows = table["row"].to_numpy()
        self.boxes = []
        for record in table.to_dict("records"):
            letterbox = cache.letterbox_from_record(record)
            original = boxes_array(record["boxes"])
            if len(original) == 0 and negative_boxes == "whole_image":
                original = np.array([[0.0, 0.0, letterbox.width, letterbox.height]])
            self.boxes.append(
                torch.as_tensor(letterbox.to_cache(xywh_to_xyxy(original)), dtype=torch.float32))
        self.transform = _augmentation(augment) if augment is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, index: int, pixels: np.ndarray) -> tuple[torch.Tensor, dict]:
        image = torch.from_numpy(np.array(pixels, copy=True))[None]
        boxes = self.boxes[index]
        labels = torch.full((len(boxes),), OPACITY_LABEL, dtype=torch.int64)
        if self.transform is not None:
            image, target = self.transform(
                tv_tensors.Image(image),
                {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY",
                                                   canvas_size=(self.size, self.size)),
                 "labels": labels},
            )
            image = image.as_subclass(torch.Tensor)
            boxes, labels = target["boxes"].as_subclass(torch.Tensor), target["labels"]
        # Targets travel as small numpy arrays: pickled inline from DataLoader workers,
        # where every tensor would cost a shared-memory handle per image.
        return image, {"boxes": boxes.reshape(-1, 4).numpy(), "labels": labels.numpy()}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return self._item(index, self.cache.images[self.rows[index]])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, dict]]:
        # One sorted fancy read from the memory map per batch instead of one per image.
        rows = self.rows[indices]
        order = np.argsort(rows, kind="stable")
        block = self.cache.images[rows[order]]
        pixels = np.empty_like(block)
        pixels[order] = block
        return [self._item(i, p) for i, p in zip(indices, pixels, strict=True)]


def detection_collate(batch: list[tuple[torch.Tensor, dict]]
                      ) -> tuple[torch.Tensor, list[dict]]:
    """Images stacked as uint8 (B, 1, S, S) (all the same size); targets stay a list."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


def targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    """Detection targets (numpy or tensors) as tensors on ``device``."""
    return [{k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in t.items()}
            for t in targets]


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled global batches from ``seed + epoch``; each DDP rank takes its slice."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            if self.shuffle and len(batch) < self.batch_size and not self._only_batch:
                break  # drop the last partial batch so every rank has work
            yield batch[self.rank::self.world_size]

    @property
    def _only_batch(self) -> bool:
        """Fewer items than one batch, in one process: train on them rather than not at all."""
        return self.n < self.batch_size and self.world_size == 1

    def __len__(self) -> int:
        full = self.n // self.batch_size
        if not self.shuffle:
            return math.ceil(self.n / self.batch_size)
        return 1 if self._only_batch and self.n else full


