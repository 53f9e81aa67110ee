"""One epoch of training and one of validation, as torchvision's references split them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pneumonia_kedro.metrics import best_threshold, threshold_curve
from pneumonia_kedro.models import to_model_input
from pneumonia_kedro.prediction import predict_batch
from pneumonia_kedro.training.config import TrainConfig
from pneumonia_kedro.training.data import CachedDetectionDataset, detection_collate, targets_to


@torch.inference_mode()
def predict(model: torch.nn.Module, dataset: CachedDetectionDataset, device: torch.device,
            batch_size: int = 16, progress: bool = False, desc: str = "predicting"
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes xyxy in cache pixels, scores) per item of ``dataset``, in order: the same
    ``predict_batch`` as evaluation and inference, without test-time variants."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=detection_collate)
    results = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        results.extend(predict_batch([model], images, device))
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




EpochCallback = Callable[[dict, int], None]


def schedulers(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
               ) -> tuple[torch.optim.lr_scheduler.LRScheduler, int,
                          torch.optim.lr_scheduler.LRScheduler]:
    """A linear warm-up over the first epoch's first steps, then StepLR or cosine per epoch."""
    warmup_iterations = min(config.warmup_iterations, max(steps_per_epoch - 1, 0))
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=config.warmup_factor, total_iters=max(warmup_iterations, 1))
    if config.scheduler == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    else:
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size,
                                               gamma=config.gamma)
    return warmup, warmup_iterations, main


@dataclass
class EpochStats:
    """What one rank saw in one epoch: summed loss, batches, images (all ranks), timings."""

    loss_sum: float = 0.0
    batches: int = 0
    images: int = 0
    data_wait: float = 0.0
    seconds: float = 0.0


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, config: TrainConfig,
                    epoch: int, warmup: torch.optim.lr_scheduler.LRScheduler | None = None,
                    warmup_iterations: int = 0, world_size: int = 1, show: bool = True
                    ) -> EpochStats:
    """Forward, sum the loss dict, stop on a non-finite loss, step (AMP-scaled, clipped)."""
    use_amp = config.amp and device.type == "cuda"
    channels_last = config.channels_last and device.type == "cuda"
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    stats, started = EpochStats(), time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
               disable=not show)
    fetched = time.perf_counter()
    for step, (images, batch_targets) in enumerate(loader):
        stats.data_wait += time.perf_counter() - fetched
        inputs = to_model_input(images, device, channels_last)
        targets = targets_to(batch_targets, device)
        with torch.autocast(device.type, enabled=use_amp):
            losses = model(inputs, targets)
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
        if warmup is not None and step < warmup_iterations:
            warmup.step()
        stats.loss_sum += loss_value
        stats.batches += 1
        stats.images += len(images) * world_size
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{stats.loss_sum / stats.batches:.3f}",
                        img_s=f"{stats.images / elapsed:.1f}")
        bar.update()
        fetched = time.perf_counter()
    bar.close()
    stats.seconds = time.perf_counter() - started
    return stats


def evaluate_epoch(model: torch.nn.Module, validation_loader: DataLoader,
                   validation_data: CachedDetectionDataset, device: torch.device,
                   config: TrainConfig) -> dict:
    """Validation loss, and the competition metric at the configured or best threshold."""
    loss = validation_loss(model, validation_loader, device)
    predictions = predict(model, validation_data, device, config.validation_batch_size)
    metric, threshold = validation_metric(predictions, validation_data, config.score_threshold,
                                          config.inclusive_iou)
    return {"validation_loss": loss, "validation_competition_metric": metric,
            "validation_score_threshold": threshold}
