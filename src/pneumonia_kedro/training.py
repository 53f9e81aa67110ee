"""Training: a dataset over the image cache, the loop, checkpoints, resume and DDP.

Images stay uint8 until the device, where ``to_model_input`` converts and normalises them.
Every epoch reseeds python, numpy and torch from ``seed + epoch``, so data order and
augmentation depend only on the epoch: a run resumed from a checkpoint ends with the same
weights as an uninterrupted one (on the CPU, where kernels are deterministic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm

from pneumonia_kedro.boxes import xywh_to_xyxy
from pneumonia_kedro.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, Range
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.labels import boxes_array
from pneumonia_kedro.metrics import best_threshold, threshold_curve
from pneumonia_kedro.models import (
    OPACITY_LABEL,
    ModelConfig,
    build_model,
    detect,
    to_model_input,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Box-aware augmentation at training time (none at validation)."""

    RANGES = {"horizontal_flip": PROBABILITY, "translate": Range(0, 0.5),
              "brightness": Range(0, 1), "contrast": Range(0, 1)}

    horizontal_flip: float = 0.5
    scale: tuple = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """The notebook's knobs (batch 8, SGD 0.005/0.9/0.0005, StepLR 3/0.1, 5 epochs) and more."""

    RANGES = {"epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE,
              "validation_batch_size": AT_LEAST_ONE, "learning_rate": POSITIVE,
              "momentum": Range(0, 1, high_open=True), "weight_decay": NON_NEGATIVE,
              "step_size": AT_LEAST_ONE, "gamma": Range(0, 1, low_open=True),
              "warmup_iterations": NON_NEGATIVE, "warmup_factor": Range(0, 1, low_open=True),
              "grad_clip_norm": POSITIVE, "num_workers": NON_NEGATIVE,
              "score_threshold": PROBABILITY, "world_size": AT_LEAST_ONE}

    epochs: int = 5
    batch_size: int = 8
    validation_batch_size: int = 16
    learning_rate: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.0005
    scheduler: Literal["step", "cosine"] = "step"
    step_size: int = 3
    gamma: float = 0.1
    warmup_iterations: int = 100
    warmup_factor: float = 0.001
    grad_clip_norm: float | None = 10.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # on CUDA only
    channels_last: bool = True  # on CUDA only
    seed: int = 42
    num_workers: int = 0
    negative_boxes: Literal["empty", "whole_image"] = "empty"
    score_threshold: float | None = None  # per-epoch metric; None: best of a 0.05 grid
    inclusive_iou: bool = False
    resume: bool = True  # from a last checkpoint of the same settings and data
    world_size: int = 1  # DDP processes (GPUs, or CPU processes on gloo)
    progress: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or "
                           "'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


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
            if self.shuffle and len(batch) < self.batch_size:
                break  # drop the last partial batch so every rank has work
            yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        full = self.n // self.batch_size
        return full if self.shuffle else math.ceil(self.n / self.batch_size)


@torch.inference_mode()
def predict(model: torch.nn.Module, dataset: CachedDetectionDataset, device: torch.device,
            batch_size: int = 16, progress: bool = False, desc: str = "predicting"
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes xyxy in cache pixels, scores) per item of ``dataset``, in order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=detection_collate)
    results = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        results.extend((boxes.numpy(), scores.numpy())
                       for boxes, scores in detect(model, images, device))
    return results


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def validation_metric(predictions: list[tuple[np.ndarray, np.ndarray]],
                      dataset: CachedDetectionDataset, threshold: float | None,
                      inclusive: bool = False) -> tuple[float, float]:
    """(competition metric, score threshold) in cache pixels (IoU is scale-invariant).

    With ``threshold`` None the best threshold of a 0.05 grid is used, as evaluation does.
    """
    grid = THRESHOLD_GRID if threshold is None else [threshold]
    truth = [b.numpy() for b in dataset.boxes]  # dataset.boxes are tensors
    curve = threshold_curve(truth, [p[0] for p in predictions], [p[1] for p in predictions],
                            grid, inclusive)
    threshold, metric = best_threshold(curve)
    return metric, threshold


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Mean summed loss on the validation split (losses need train mode; BatchNorm frozen)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    total, batches = 0.0, 0
    for images, targets in loader:
        losses = model(to_model_input(images, device), targets_to(targets, device))
        total += float(sum(losses.values()))
        batches += 1
    return total / max(batches, 1)


class CheckpointStore:
    """The last epoch's training state and the best weights in a folder; tensors only.

    A store bound to a training ``fingerprint`` (settings and data) only resumes from a last
    checkpoint written under the same fingerprint.
    """

    def __init__(self, path: str | Path, fingerprint: str = "") -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def bound_to(self, fingerprint: str) -> CheckpointStore:
        return CheckpointStore(self.path, fingerprint)

    @property
    def last_file(self) -> Path:
        return self.path / "last.pt"

    @property
    def best_file(self) -> Path:
        return self.path / "best.pt"

    def _save(self, obj: dict, target: Path) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.path, suffix=".partial", delete=False) as tmp:
            torch.save(obj, tmp.name)
        os.replace(tmp.name, target)

    def save_last(self, state: dict) -> None:
        self._save({**state, "fingerprint": self.fingerprint}, self.last_file)

    def save_best(self, state_dict: dict) -> None:
        self._save({"state_dict": state_dict, "fingerprint": self.fingerprint}, self.best_file)

    def load_last(self) -> dict | None:
        if not self.last_file.is_file():
            return None
        last = torch.load(self.last_file, map_location="cpu", weights_only=True)
        if last.get("fingerprint", "") != self.fingerprint:
            logger.info("the checkpoint in %s is from other settings or data; training from the "
                        "first epoch", self.path)
            return None
        return last

    def load_best(self) -> dict | None:
        if not self.best_file.is_file():
            return None
        best = torch.load(self.best_file, map_location="cpu", weights_only=True)
        return best["state_dict"] if best.get("fingerprint", "") == self.fingerprint else None


# Settings that change neither the trained weights nor the curves.
_NOT_FINGERPRINTED = {"resume", "progress", "num_workers", "validation_batch_size"}


def training_fingerprint(model_config: ModelConfig, config: TrainConfig,
                         caches: list[ImageCache], patient_tables: list[pd.DataFrame]) -> str:
    """A digest of everything a training run's result depends on."""
    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_FINGERPRINTED}
    digest = hashlib.sha256(json.dumps(
        [model_config.to_dict(), settings, [cache.manifest["fingerprint"] for cache in caches]],
        sort_keys=True, default=str).encode())
    for table in patient_tables:
        digest.update(pd.util.hash_pandas_object(table.astype(str), index=False).values.tobytes())
    return digest.hexdigest()


@dataclass
class TrainingResult:
    """The best epoch's weights (by validation metric), the last weights, and the curves."""

    best_state: dict
    last_state: dict
    best_epoch: int
    best_metric: float
    history: list[dict]


EpochCallback = Callable[[dict, int], None]


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "numpy_pos": int(numpy_state[2]), "torch": torch.get_rng_state()}


def _schedulers(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    warmup_iterations = min(config.warmup_iterations, max(steps_per_epoch - 1, 0))
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=config.warmup_factor, total_iters=max(warmup_iterations, 1))
    if config.scheduler == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    else:
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size,
                                               gamma=config.gamma)
    return warmup, warmup_iterations, main


def _train_process(rank: int, model_config: ModelConfig, config: TrainConfig,
                   train_data: CachedDetectionDataset, validation_data: CachedDetectionDataset,
                   checkpoints: CheckpointStore | None, on_epoch_end: EpochCallback | None,
                   result_file: str | None, port: int) -> TrainingResult | None:
    world_size = config.world_size
    distributed = world_size > 1
    device = resolve_device(config.device)
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        if device.type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    seed_everything(config.seed)
    model = build_model(model_config).to(device)
    use_cuda = device.type == "cuda"
    channels_last = config.channels_last and use_cuda
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    sampler = EpochBatchSampler(len(train_data), config.batch_size, config.seed,
                                rank=rank, world_size=world_size)
    loader = DataLoader(train_data, batch_sampler=sampler, collate_fn=detection_collate,
                        num_workers=config.num_workers, pin_memory=use_cuda,
                        persistent_workers=config.num_workers > 0)
    validation_loader = DataLoader(validation_data, batch_size=config.validation_batch_size,
                                   shuffle=False, collate_fn=detection_collate)
    warmup, warmup_iterations, main_scheduler = _schedulers(optimizer, config, len(sampler))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and use_cuda)
    if distributed and use_cuda:
        # BatchNorm over the global batch, as one process would compute it (GPU only).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = DistributedDataParallel(model) if distributed else model

    start_epoch, best_metric, best_epoch, history = 0, -1.0, -1, []
    best_state: dict | None = None
    if config.resume and checkpoints is not None and (last := checkpoints.load_last()):
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        main_scheduler.load_state_dict(last["scheduler"])
        start_epoch = int(last["epoch"]) + 1
        best_metric, best_epoch = float(last["best_metric"]), int(last["best_epoch"])
        history = list(last["history"])
        best_state = checkpoints.load_best()
        logger.info("resuming after epoch %d of %d from %s", start_epoch, config.epochs,
                    checkpoints.last_file)
        if on_epoch_end is not None and rank == 0:  # a new run gets the whole curve
            for record in history:
                on_epoch_end({k: v for k, v in record.items() if k != "epoch"},
                             int(record["epoch"]))

    for epoch in range(start_epoch, config.epochs):
        seed_everything(config.seed + epoch)
        sampler.set_epoch(epoch)
        trained.train()
        running, seen, wait, started = 0.0, 0, 0.0, time.perf_counter()
        bar = tqdm(total=len(sampler), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not config.progress or rank != 0)
        fetched = time.perf_counter()
        for step, (images, batch_targets) in enumerate(loader):
            wait += time.perf_counter() - fetched
            inputs = to_model_input(images, device, channels_last)
            targets = targets_to(batch_targets, device)
            with torch.autocast(device.type, enabled=config.amp and use_cuda):
                losses = trained(inputs, targets)
                loss = sum(losses.values())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss is {loss_value} at epoch {epoch + 1}, step {step + 1}: "
                    f"{ {k: float(v.detach()) for k, v in losses.items()} }; lower the "
                    "learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            if epoch == 0 and step < warmup_iterations:
                warmup.step()
            running += loss_value
            seen += len(images) * world_size
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{running / (step + 1):.3f}", img_s=f"{seen / elapsed:.1f}")
            bar.update()
            fetched = time.perf_counter()
        bar.close()
        main_scheduler.step()
        elapsed = time.perf_counter() - started
        if distributed:
            dist.barrier()
        if rank != 0:
            continue

        val_loss = validation_loss(model, validation_loader, device)
        predictions = predict(model, validation_data, device, config.validation_batch_size)
        metric, threshold = validation_metric(predictions, validation_data,
                                              config.score_threshold, config.inclusive_iou)
        record = {
            "epoch": epoch + 1, "train_loss": running / max(len(sampler), 1),
            "validation_loss": val_loss, "validation_competition_metric": metric,
            "validation_score_threshold": threshold,
            "images_per_second": seen / elapsed, "data_wait_share": wait / elapsed,
            "learning_rate": optimizer.param_groups[0]["lr"],
        }
        history.append(record)
        logger.info("epoch %d/%d: train loss %.4f, validation loss %.4f, competition metric "
                    "%.4f, %.1f images/s", epoch + 1, config.epochs, record["train_loss"],
                    val_loss, metric, record["images_per_second"])
        if metric > best_metric:
            best_metric, best_epoch = metric, epoch + 1
            best_state = _cpu_state(model)
            if checkpoints is not None:
                checkpoints.save_best(best_state)
        if checkpoints is not None:
            checkpoints.save_last({
                "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": main_scheduler.state_dict(), "epoch": epoch,
                "best_metric": best_metric, "best_epoch": best_epoch, "history": history,
                "rng": _rng_state(), "model_config": model_config.to_dict(),
                "train_config": asdict(config),
            })
        if on_epoch_end is not None:
            on_epoch_end({k: v for k, v in record.items() if k != "epoch"}, epoch + 1)

    if rank != 0:
        dist.barrier()
        dist.destroy_process_group()
        return None
    if best_state is None:  # no epoch ran (all were done before a resume)
        best_state = _cpu_state(model)
    result = TrainingResult(best_state=best_state, last_state=_cpu_state(model),
                            best_epoch=best_epoch, best_metric=best_metric, history=history)
    if distributed:
        torch.save(asdict(result), result_file)
        dist.barrier()
        dist.destroy_process_group()
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_model(model_config: ModelConfig, config: TrainConfig,
                train_data: CachedDetectionDataset, validation_data: CachedDetectionDataset,
                checkpoints: CheckpointStore | None = None,
                on_epoch_end: EpochCallback | None = None) -> TrainingResult:
    """Train, in this process or in ``config.world_size`` DDP processes (spawned here)."""
    if config.batch_size % config.world_size:
        raise ValueError(f"train.batch_size {config.batch_size} must be a multiple of "
                         f"world_size {config.world_size}")
    if config.world_size == 1:
        return _train_process(0, model_config, config, train_data, validation_data,
                              checkpoints, on_epoch_end, None, 0)
    with tempfile.TemporaryDirectory() as folder:
        result_file = str(Path(folder) / "result.pt")
        mp.spawn(_train_process, nprocs=config.world_size, join=True,
                 args=(model_config, config, train_data, validation_data, checkpoints,
                       on_epoch_end, result_file, _free_port()))
        return TrainingResult(**torch.load(result_file, weights_only=True))
