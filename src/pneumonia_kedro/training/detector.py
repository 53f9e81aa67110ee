"""The detector's part of a training run (``fit.fit_task`` does the rest, as for the
classifier): the detector (any ``model.architecture``: Faster R-CNN or the one-stage FCOS,
both torchvision detection models returning a loss dict in train mode and boxes in eval mode),
the notebook's SGD with warm-up then StepLR or cosine, the loss dict, and the competition
metric on the validation split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.utils.data import DataLoader

from pneumonia_kedro.models import ModelConfig, build_model, to_model_input
from pneumonia_kedro.training.config import TrainConfig
from pneumonia_kedro.training.data import CachedDetectionDataset, detection_collate, targets_to
from pneumonia_kedro.training.engine import Optimisation, predict, validation_metric


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


@dataclass
class DetectorTask:
    """The detector as a ``TrainingTask``: best epoch by the validation competition
    metric (at the configured score threshold, or the best of a 0.05 grid)."""

    model_config: ModelConfig
    config: TrainConfig
    train_data: CachedDetectionDataset
    validation_data: CachedDetectionDataset

    name: ClassVar[str] = "epoch"
    params: ClassVar[str] = "train"
    metric: ClassVar[str] = "validation_competition_metric"
    higher_is_better: ClassVar[bool] = True
    collate = staticmethod(detection_collate)

    def build(self) -> torch.nn.Module:
        return build_model(self.model_config)

    def optimisation(self, model: torch.nn.Module, steps_per_epoch: int) -> Optimisation:
        config = self.config
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=config.learning_rate, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        warmup, warmup_iterations, main = schedulers(optimizer, config, steps_per_epoch)
        # The warm-up runs over the first epoch's first steps only (fewer than an epoch).
        return Optimisation(optimizer, per_epoch=main, per_step=warmup,
                            per_step_limit=warmup_iterations)

    def to_device(self, batch: tuple, device: torch.device, channels_last: bool) -> tuple:
        images, targets = batch
        return to_model_input(images, device, channels_last), targets_to(targets, device)

    def losses(self, model: torch.nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        return model(inputs, targets)

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Validation loss, and the competition metric at the configured or best threshold."""
        config, data = self.config, self.validation_data
        loader = DataLoader(data, batch_size=config.validation_batch_size, shuffle=False,
                            collate_fn=detection_collate)
        loss = validation_loss(model, loader, device)
        predictions = predict(model, data, device, config.validation_batch_size)
        metric, threshold = validation_metric(predictions, data, config.score_threshold,
                                              config.inclusive_iou)
        return {"validation_loss": loss, "validation_competition_metric": metric,
                "validation_score_threshold": threshold}
