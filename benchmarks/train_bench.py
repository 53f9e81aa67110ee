"""Training-step throughput over the image cache: images/s, data-wait share, peak memory.

Shared by ``train_speed.py`` (CPU, here) and ``gpu_check.py`` (one NVIDIA GPU). A step is a
real training step of the project's loop pieces: the cache dataset and DataLoader, the
detector task's transfer to the device and loss (as ``training.engine`` calls them), backward,
SGD; on CUDA each step is synchronised so times are honest.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from pneumonia_kedro.models import ModelConfig
from pneumonia_kedro.training import (
    AugmentConfig,
    CachedDetectionDataset,
    DetectorTask,
    EpochBatchSampler,
    TrainConfig,
    detection_collate,
)


def measure(model_config: ModelConfig, dataset: CachedDetectionDataset, batch_size: int,
            steps: int, warmup: int, device: torch.device, amp: bool = False,
            channels_last: bool = False, num_workers: int = 0) -> dict:
    """Time ``steps`` training steps after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    # The engine's own pieces of a step: the detector task's device transfer and loss.
    task = DetectorTask(replace(model_config, image_size=dataset.size), TrainConfig(), dataset,
                        dataset)
    model = task.build().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.001, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=detection_collate,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    wait = compute = 0.0
    images = 0
    for step in range(warmup + steps):
        started = time.perf_counter()
        batch = next(stream)
        ready = time.perf_counter()
        moved = task.to_device(batch, device, channels_last)
        with torch.autocast(device.type, enabled=amp):
            loss = sum(task.losses(model, moved).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cuda:
            torch.cuda.synchronize(device)
        finished = time.perf_counter()
        if step >= warmup:
            wait += ready - started
            compute += finished - ready
            images += len(batch[0])
    total = wait + compute
    return {
        "images_per_second": images / total,
        "data_wait_share": wait / total,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "steps": steps,
        "batch_size": batch_size,
    }


def training_augmentation() -> AugmentConfig:
    """The default training augmentation, so data time includes its cost."""
    return AugmentConfig()
