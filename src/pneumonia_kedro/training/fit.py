"""The whole training run, the same for the detector and the classifier: per-epoch seeding,
AMP on CUDA, checkpoints and resume, best-epoch selection, DDP start-up.

Every epoch reseeds python, numpy and torch from ``seed + epoch``, so data order and
augmentation depend only on the epoch: a run resumed from a checkpoint ends with the same
weights as an uninterrupted one (on the CPU, where kernels are deterministic).

Checkpoints are the engine's own run storage, in a folder named by the parameters (as
torchvision's references' ``--output-dir``), not a Kedro dataset: they are written during the
node, by whichever process is DDP rank 0, and read back only by the next run of the same
training, so nothing downstream consumes them.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pneumonia_kedro.models import ModelConfig
from pneumonia_kedro.training.checkpoints import CheckpointStore, restore, resume_state
from pneumonia_kedro.training.config import (
    TrainConfig,
    auto_world_size,
    resolve_device,
    seed_everything,
)
from pneumonia_kedro.training.data import CachedDetectionDataset, EpochBatchSampler
from pneumonia_kedro.training.detector import DetectorTask
from pneumonia_kedro.training.engine import (
    EpochCallback,
    EpochStats,
    FitSettings,
    TrainingTask,
    train_one_epoch,
)
from pneumonia_kedro.ui import free_port

if TYPE_CHECKING:
    from pneumonia_kedro.engines import EngineConfig

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


@dataclass
class _Progress:
    """Where a run stands: what a checkpoint keeps besides the training objects."""

    start_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _start_process_group(rank: int, world_size: int, device: torch.device, port: int
                         ) -> torch.device:
    """Join the DDP group (NCCL on GPUs, gloo on CPUs); the device this rank trains on."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():  # Ray Train's workers join their group before this
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if device.type != "cuda":
        return device
    # Ray Train sets LOCAL_RANK (ranks span machines); mp.spawn's ranks are local.
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    return device


def _mean_over_ranks(value: float, device: torch.device, distributed: bool) -> float:
    """The mean of ``value`` over all DDP ranks (each saw its own share of the batch)."""
    if not distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


def _improves(metric: float, best: float | None, higher_is_better: bool) -> bool:
    """The first epoch is the best so far; later a finite metric must beat it (a NaN
    metric, say ROC AUC on one class, beats only a NaN best)."""
    if best is None or not math.isfinite(best):
        return best is None or math.isfinite(metric)
    return math.isfinite(metric) and (metric > best if higher_is_better else metric < best)


def _prepare(task: TrainingTask, settings: FitSettings, rank: int, device: torch.device
             ) -> tuple:
    """The model (and its DDP wrapper), the epoch sampler and loader, optimiser and scaler."""
    world_size, use_cuda = settings.world_size, device.type == "cuda"
    seed_everything(settings.seed)
    model = task.build().to(device)
    if settings.channels_last and use_cuda:
        model = model.to(memory_format=torch.channels_last)
    sampler = EpochBatchSampler(len(task.train_data), settings.batch_size, settings.seed,
                                rank=rank, world_size=world_size)
    optimisation = task.optimisation(model, len(sampler))
    loader = DataLoader(task.train_data, batch_sampler=sampler, collate_fn=task.collate,
                        num_workers=settings.num_workers, pin_memory=use_cuda,
                        persistent_workers=settings.num_workers > 0)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp and use_cuda)
    if world_size > 1 and use_cuda:
        # BatchNorm over the global batch, as one process would compute it (GPU only).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = DistributedDataParallel(model) if world_size > 1 else model
    return model, trained, sampler, loader, optimisation, scaler


def _resume(checkpoints: CheckpointStore | None, model: torch.nn.Module, optimisation: object,
            scaler: torch.amp.GradScaler, settings: FitSettings,
            on_epoch_end: EpochCallback | None, rank: int) -> _Progress:
    """The progress of the last checkpoint of the same settings and data, else a fresh one."""
    if not settings.resume or checkpoints is None or not (last := checkpoints.load_last()):
        return _Progress()
    best_state = checkpoints.best_state(last)
    if best_state is None and int(last["best_epoch"]) > 0:
        logger.warning("%s holds no weights of the best epoch %d that %s names; training "
                       "from the first epoch", checkpoints.best_file, int(last["best_epoch"]),
                       checkpoints.last_file)
        return _Progress()
    restore(last, model, optimisation, scaler)
    progress = _Progress(int(last["epoch"]) + 1, last["best_metric"], int(last["best_epoch"]),
                         list(last["history"]), best_state)
    logger.info("resuming after epoch %d of %d from %s", progress.start_epoch, settings.epochs,
                checkpoints.last_file)
    if on_epoch_end is not None and rank == 0:  # a new run gets the whole curve
        for record in progress.history:
            on_epoch_end({k: v for k, v in record.items() if k != "epoch"},
                         int(record["epoch"]))
    return progress


def _end_epoch(task: TrainingTask, settings: FitSettings, model: torch.nn.Module,
               optimisation: object, scaler: torch.amp.GradScaler, progress: _Progress,
               epoch: int, stats: EpochStats, train_loss: float, device: torch.device,
               checkpoints: CheckpointStore | None) -> dict:
    """Validate, record, keep the best weights and checkpoint (rank 0); the epoch's record."""
    validation = task.validate(model, device)
    record = {"epoch": epoch + 1, "train_loss": train_loss, **validation,
              "images_per_second": stats.images / stats.seconds,
              "data_wait_share": stats.data_wait / stats.seconds,
              "learning_rate": optimisation.learning_rate}
    progress.history.append(record)
    logger.info("%s %d/%d: train loss %.4f, %s, %.1f images/s", task.name, epoch + 1,
                settings.epochs, train_loss,
                ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in validation.items()),
                record["images_per_second"])
    improved = _improves(record[task.metric], progress.best_metric, task.higher_is_better)
    if improved:
        progress.best_metric, progress.best_epoch = record[task.metric], epoch + 1
        progress.best_state = _cpu_state(model)
    if checkpoints is not None:
        # last.pt first: killed before best.pt, it names itself the best epoch and holds
        # those weights (CheckpointStore.best_state); best.pt is then an older epoch's.
        checkpoints.save_last(resume_state(
            model, optimisation, scaler, epoch=epoch, best_metric=progress.best_metric,
            best_epoch=progress.best_epoch, history=progress.history,
            settings=asdict(settings)))
        if improved:
            checkpoints.save_best(progress.best_state, epoch + 1)
    return record


def _train_process(rank: int, task: TrainingTask, settings: FitSettings, fold: int | None,
                   checkpoints: CheckpointStore | None, on_epoch_end: EpochCallback | None,
                   result_file: str | None, port: int) -> TrainingResult | None:
    world_size = settings.world_size
    distributed = world_size > 1
    device = resolve_device(settings.device, fold)
    if distributed:
        device = _start_process_group(rank, world_size, device, port)
    model, trained, sampler, loader, optimisation, scaler = _prepare(task, settings, rank,
                                                                      device)
    progress = _resume(checkpoints, model, optimisation, scaler, settings, on_epoch_end, rank)
    for epoch in range(progress.start_epoch, settings.epochs):
        seed_everything(settings.seed + epoch)
        sampler.set_epoch(epoch)
        trained.train()
        stats = train_one_epoch(trained, loader, optimisation, scaler, device, settings, task,
                                epoch, world_size, show=settings.progress and rank == 0)
        optimisation.epoch_done()
        # Each rank's loss is its share of the global batch: log the mean over ranks.
        train_loss = _mean_over_ranks(stats.loss_sum / max(len(sampler), 1), device,
                                      distributed)
        if distributed:
            dist.barrier()
        if rank == 0:
            record = _end_epoch(task, settings, model, optimisation, scaler, progress, epoch,
                                stats, train_loss, device, checkpoints)
            if on_epoch_end is not None:
                on_epoch_end({k: v for k, v in record.items() if k != "epoch"}, epoch + 1)

    if rank != 0:
        dist.barrier()
        dist.destroy_process_group()
        return None
    result = TrainingResult(
        best_state=_cpu_state(model) if progress.best_state is None else progress.best_state,
        last_state=_cpu_state(model), best_epoch=progress.best_epoch,
        best_metric=progress.best_metric, history=progress.history,
        resumed_after_epoch=progress.start_epoch)
    if distributed:
        torch.save(asdict(result), result_file)
        dist.barrier()
        dist.destroy_process_group()
    return result


def fit_task(task: TrainingTask, settings: FitSettings,
             checkpoints: CheckpointStore | None = None,
             on_epoch_end: EpochCallback | None = None, fold: int | None = None,
             engine: EngineConfig | None = None) -> TrainingResult:
    """Train ``task``, in this process or in ``settings.world_size`` DDP processes (spawned
    here), or with ``engine.backend: ray`` on Ray Train's workers (the same per-rank
    function). ``fold``: the cross-validation fold, whose GPU ``auto`` picks among several."""
    if engine is not None and engine.is_ray:
        from pneumonia_kedro.engines.ray_engine import fit_on_ray  # no Ray for local runs

        return fit_on_ray(task, settings, checkpoints, on_epoch_end, fold, engine)
    if settings.world_size == "auto":
        settings = replace(settings, world_size=auto_world_size(settings.device))
    if settings.batch_size % settings.world_size:
        raise ValueError(f"{task.params}.batch_size {settings.batch_size} must be a multiple "
                         f"of world_size {settings.world_size}")
    if settings.world_size == 1:
        return _train_process(0, task, settings, fold, checkpoints, on_epoch_end, None, 0)
    with tempfile.TemporaryDirectory() as folder:
        result_file = str(Path(folder) / "result.pt")
        mp.spawn(_train_process, nprocs=settings.world_size, join=True,
                 args=(task, settings, fold, checkpoints, on_epoch_end, result_file,
                       free_port()))
        return TrainingResult(**torch.load(result_file, weights_only=True))


def train_model(model_config: ModelConfig, config: TrainConfig,
                train_data: CachedDetectionDataset, validation_data: CachedDetectionDataset,
                checkpoints: CheckpointStore | None = None,
                on_epoch_end: EpochCallback | None = None, fold: int | None = None,
                engine: EngineConfig | None = None) -> TrainingResult:
    """Train the detector (``fit_task`` of a ``DetectorTask``)."""
    return fit_task(DetectorTask(model_config, config, train_data, validation_data), config,
                    checkpoints, on_epoch_end, fold, engine)
