"""One epoch of training, the same for every model (``TrainingTask`` says what differs), and
the detector's validation predictions and metric."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pneumonia_kedro.metrics import best_threshold, threshold_curve
from pneumonia_kedro.training.data import CachedDetectionDataset


def predict(model: torch.nn.Module, dataset: CachedDetectionDataset, device: torch.device,
            batch_size: int = 16, progress: bool = False, desc: str = "predicting"
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes xyxy in cache pixels, scores) per item of ``dataset``, in order: the batches
    and detection of ``prediction.predict`` (evaluation, inference), without test-time
    variants."""
    # Imported here: prediction reaches the classifier, which trains with this engine.
    from pneumonia_kedro.ensemble import Networks
    from pneumonia_kedro.inference import Square
    from pneumonia_kedro.prediction import TTAConfig, predict_batches

    squares = [Square(patient_id, dataset.cache.images[row])
               for patient_id, row in zip(dataset.patient_ids, dataset.rows, strict=True)]
    batches = predict_batches(Networks([model], [], [], device), squares, TTAConfig(),
                              batch_size, progress, desc)
    return [image for _, runs, _ in batches for image in runs[0]]


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


EpochCallback = Callable[[dict, int], None]
LRScheduler = torch.optim.lr_scheduler.LRScheduler


class FitSettings(Protocol):
    """The settings the engine reads (``TrainConfig`` and ``ClassifierConfig`` have them)."""

    epochs: int
    batch_size: int
    seed: int
    device: str
    amp: bool  # on CUDA only
    channels_last: bool  # on CUDA only
    grad_clip_norm: float | None
    num_workers: int
    resume: bool
    world_size: int | str
    progress: bool


@dataclass
class Optimisation:
    """An optimiser and its learning-rate schedules: ``per_step`` is stepped after each of the
    run's first ``per_step_limit`` steps (every step when None), ``per_epoch`` after each
    epoch."""

    optimizer: torch.optim.Optimizer
    per_epoch: LRScheduler | None = None
    per_step: LRScheduler | None = None
    per_step_limit: int | None = None

    def step_done(self, global_step: int) -> None:
        if self.per_step is not None and (self.per_step_limit is None
                                          or global_step < self.per_step_limit):
            self.per_step.step()

    def epoch_done(self) -> None:
        if self.per_epoch is not None:
            self.per_epoch.step()

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.per_epoch.state_dict() if self.per_epoch else {},
                "step_scheduler": self.per_step.state_dict() if self.per_step else {}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.per_epoch is not None:
            self.per_epoch.load_state_dict(state["scheduler"])
        if self.per_step is not None and state.get("step_scheduler"):
            self.per_step.load_state_dict(state["step_scheduler"])


class TrainingTask(Protocol):
    """What differs between the models the engine trains (``DetectorTask``,
    ``classifier.ClassifierTask``); the engine does the rest the same way for both."""

    name: str  # the progress bar's and the log's word for an epoch
    params: str  # the parameter group, for messages
    metric: str  # the validation record's key that picks the best epoch
    higher_is_better: bool
    train_data: Dataset

    def collate(self, batch: list) -> tuple: ...
    def build(self) -> torch.nn.Module: ...
    def optimisation(self, model: torch.nn.Module, steps_per_epoch: int) -> Optimisation: ...
    def to_device(self, batch: tuple, device: torch.device, channels_last: bool) -> tuple: ...
    def losses(self, model: torch.nn.Module, batch: tuple) -> dict[str, torch.Tensor]: ...
    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]: ...


@dataclass
class EpochStats:
    """What one rank saw in one epoch: summed loss, batches, images (all ranks), timings."""

    loss_sum: float = 0.0
    batches: int = 0
    images: int = 0
    data_wait: float = 0.0
    seconds: float = 0.0


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimisation: Optimisation,
                    scaler: torch.amp.GradScaler, device: torch.device, settings: FitSettings,
                    task: TrainingTask, epoch: int, world_size: int = 1, show: bool = True
                    ) -> EpochStats:
    """Forward, sum the loss dict, stop on a non-finite loss, step (AMP-scaled, clipped)."""
    use_amp = settings.amp and device.type == "cuda"
    channels_last = settings.channels_last and device.type == "cuda"
    optimizer = optimisation.optimizer
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    stats, started = EpochStats(), time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"{task.name} {epoch + 1}/{settings.epochs}",
               unit="batch", disable=not show)
    fetched = time.perf_counter()
    for step, batch in enumerate(loader):
        stats.data_wait += time.perf_counter() - fetched
        moved = task.to_device(batch, device, channels_last)
        with torch.autocast(device.type, enabled=use_amp):
            losses = task.losses(model, moved)
            loss = sum(losses.values())
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"loss is {loss_value} at epoch {epoch + 1}, step {step + 1}: "
                f"{ {k: float(v.detach()) for k, v in losses.items()} }; lower the "
                "learning rate")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if settings.grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimisation.step_done(epoch * len(loader) + step)
        stats.loss_sum += loss_value
        stats.batches += 1
        stats.images += len(batch[0]) * world_size
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{stats.loss_sum / stats.batches:.3f}",
                        img_s=f"{stats.images / elapsed:.1f}")
        bar.update()
        fetched = time.perf_counter()
    bar.close()
    stats.seconds = time.perf_counter() - started
    return stats
