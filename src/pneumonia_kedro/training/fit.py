"""The whole training run: resume, epochs, best-model selection and DDP start-up.

Every epoch reseeds python, numpy and torch from ``seed + epoch``, so data order and
augmentation depend only on the epoch: a run resumed from a checkpoint ends with the same
weights as an uninterrupted one (on the CPU, where kernels are deterministic).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pneumonia_kedro.models import ModelConfig, build_model
from pneumonia_kedro.training.checkpoints import CheckpointStore, restore, resume_state
from pneumonia_kedro.training.config import (
    TrainConfig,
    auto_world_size,
    resolve_device,
    seed_everything,
)
from pneumonia_kedro.training.data import (
    CachedDetectionDataset,
    EpochBatchSampler,
    detection_collate,
)
from pneumonia_kedro.training.engine import (
    EpochCallback,
    EpochStats,
    evaluate_epoch,
    schedulers,
    train_one_epoch,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """The best epoch's weights (by validation metric), the last weights, and the curves."""

    best_state: dict
    last_state: dict
    best_epoch: int
    best_metric: float
    history: list[dict]
    resumed_after_epoch: int = 0  # epochs taken from a checkpoint (0: trained from scratch)


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _start_process_group(rank: int, world_size: int, device: torch.device, port: int
                         ) -> torch.device:
    """Join the DDP group (NCCL on GPUs, gloo on CPUs); the device this rank trains on."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if device.type != "cuda":
        return device
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    return device


def _mean_over_ranks(value: float, device: torch.device, distributed: bool) -> float:
    """The mean of ``value`` over all DDP ranks (each saw its own share of the batch)."""
    if not distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


def _epoch_record(epoch: int, stats: EpochStats, train_loss: float, validation: dict,
                  learning_rate: float) -> dict:
    return {"epoch": epoch + 1, "train_loss": train_loss, **validation,
            "images_per_second": stats.images / stats.seconds,
            "data_wait_share": stats.data_wait / stats.seconds,
            "learning_rate": learning_rate}


def _train_process(rank: int, model_config: ModelConfig, config: TrainConfig,
                   train_data: CachedDetectionDataset, validation_data: CachedDetectionDataset,
                   checkpoints: CheckpointStore | None, on_epoch_end: EpochCallback | None,
                   result_file: str | None, port: int) -> TrainingResult | None:
    world_size = config.world_size
    distributed = world_size > 1
    device = resolve_device(config.device)
    if distributed:
        device = _start_process_group(rank, world_size, device, port)
    seed_everything(config.seed)
    model = build_model(model_config).to(device)
    use_cuda = device.type == "cuda"
    if config.channels_last and use_cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    sampler = EpochBatchSampler(len(train_data), config.batch_size, config.seed,
                                rank=rank, world_size=world_size)
    loader = DataLoader(train_data, batch_sampler=sampler, collate_fn=detection_collate,
                        num_workers=config.num_workers, pin_memory=use_cuda,
                        persistent_workers=config.num_workers > 0)
    validation_loader = DataLoader(validation_data, batch_size=config.validation_batch_size,
                                   shuffle=False, collate_fn=detection_collate)
    warmup, warmup_iterations, main_scheduler = schedulers(optimizer, config, len(sampler))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and use_cuda)
    if distributed and use_cuda:
        # BatchNorm over the global batch, as one process would compute it (GPU only).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = DistributedDataParallel(model) if distributed else model

    start_epoch, best_metric, best_epoch, history = 0, -1.0, -1, []
    best_state: dict | None = None
    if config.resume and checkpoints is not None and (last := checkpoints.load_last()):
        restore(last, model, optimizer, main_scheduler, scaler)
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
        stats = train_one_epoch(trained, loader, optimizer, scaler, device, config, epoch,
                                warmup if epoch == 0 else None, warmup_iterations,
                                world_size, show=config.progress and rank == 0)
        main_scheduler.step()
        # Each rank's loss is its share of the global batch: log the mean over ranks.
        train_loss = _mean_over_ranks(stats.loss_sum / max(len(sampler), 1), device,
                                      distributed)
        if distributed:
            dist.barrier()
        if rank != 0:
            continue

        validation = evaluate_epoch(model, validation_loader, validation_data, device, config)
        record = _epoch_record(epoch, stats, train_loss, validation,
                               optimizer.param_groups[0]["lr"])
        history.append(record)
        logger.info("epoch %d/%d: train loss %.4f, validation loss %.4f, competition metric "
                    "%.4f, %.1f images/s", epoch + 1, config.epochs, train_loss,
                    record["validation_loss"], record["validation_competition_metric"],
                    record["images_per_second"])
        metric = record["validation_competition_metric"]
        if metric > best_metric:
            best_metric, best_epoch = metric, epoch + 1
            best_state = _cpu_state(model)
            if checkpoints is not None:
                checkpoints.save_best(best_state)
        if checkpoints is not None:
            checkpoints.save_last(resume_state(
                model, optimizer, main_scheduler, scaler, epoch=epoch, best_metric=best_metric,
                best_epoch=best_epoch, history=history, model_config=model_config.to_dict(),
                train_config=asdict(config)))
        if on_epoch_end is not None:
            on_epoch_end({k: v for k, v in record.items() if k != "epoch"}, epoch + 1)

    if rank != 0:
        dist.barrier()
        dist.destroy_process_group()
        return None
    if best_state is None:  # no epoch ran (all were done before a resume)
        best_state = _cpu_state(model)
    result = TrainingResult(best_state=best_state, last_state=_cpu_state(model),
                            best_epoch=best_epoch, best_metric=best_metric, history=history,
                            resumed_after_epoch=start_epoch)
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
    if config.world_size == "auto":
        config = replace(config, world_size=auto_world_size(config.device))
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
