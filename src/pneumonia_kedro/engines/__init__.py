"""Where the heavy work runs: ``local`` (this machine: worker processes, ``mp.spawn`` DDP) or
``ray`` (a Ray cluster: decoding tasks, Ray Train's ``TorchTrainer``, batch prediction on Ray
Data).

This module imports no Ray: ``local`` stays the default and the demo's path, and a project
installed without the ``ray`` extra runs as before. ``engines.ray_engine`` is imported only
when ``engine.backend`` is ``ray``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pneumonia_kedro.config import AT_LEAST_ONE, NON_NEGATIVE, ConfigError, from_params


@dataclass(frozen=True)
class RayTrainSettings:
    """Ray Train's scaling and fault tolerance for the detector and the classifier."""

    RANGES = {"num_workers": AT_LEAST_ONE, "cpus_per_worker": NON_NEGATIVE,
              "gpus_per_worker": NON_NEGATIVE, "max_failures": NON_NEGATIVE}

    num_workers: int = 2  # DDP ranks (one Ray Train worker each), on any node
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: NCCL on GPUs; 0: gloo on CPUs
    max_failures: int = 3  # worker-group restarts after a lost worker (FailureConfig)


@dataclass(frozen=True)
class RayInferenceSettings:
    """Ray Data's batch prediction: a pool of actors, each holding the ensemble once."""

    RANGES = {"actors": NON_NEGATIVE, "cpus_per_actor": NON_NEGATIVE,
              "gpus_per_actor": NON_NEGATIVE}

    actors: int = 0  # the actor pool's size (0: one per cluster CPU, at most one per batch)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # > 0: each actor predicts on its GPU (inference.device auto)


@dataclass(frozen=True)
class EngineConfig:
    """``backend``: local | ray. With ray, ``address`` is empty (a Ray started by the run, on
    this machine), ``auto`` (the cluster this machine belongs to) or a ``ray://`` URL;
    ``storage`` is the run storage every node reads and writes: Ray Train's results and the
    checkpoints of a training without a checkpoint folder. It is a path on a file system
    every node mounts at the same path (a ``file://`` URL is taken as its path): the
    checkpoints and per-epoch log markers are written there as files, so an ``s3://`` URL
    became a local folder named ``s3:`` on each worker.
    """

    RANGES = {"num_cpus": AT_LEAST_ONE, "object_store_memory": AT_LEAST_ONE,
              "cache_tasks": NON_NEGATIVE}

    backend: Literal["local", "ray"] = "local"
    address: str = ""
    num_cpus: int | None = None  # a Ray started by the run: its CPUs (None: every core)
    object_store_memory: int | None = None  # bytes; None: Ray's default (30% of memory)
    storage: str = "data/06_models/ray"
    cache_tasks: int = 0  # decoding tasks in flight (0: twice the cluster's CPUs)
    train: RayTrainSettings = field(default_factory=RayTrainSettings)
    inference: RayInferenceSettings = field(default_factory=RayInferenceSettings)

    def __post_init__(self) -> None:
        if self.storage.startswith("file://"):
            object.__setattr__(self, "storage", self.storage.removeprefix("file://"))
        elif "://" in self.storage:
            raise ConfigError(
                f"params:engine.storage = {self.storage!r} is a URL, but the training writes "
                "its checkpoints and per-epoch log markers there as files: give a path on a "
                "file system every node mounts at the same path (NFS, CephFS, a ReadWriteMany "
                "volume)")

    @property
    def is_ray(self) -> bool:
        return self.backend == "ray"

    def batch_split_problem(self, batch_size: int, group: str) -> str | None:
        """What is wrong with ``<group>.batch_size`` on this engine, or None: each Ray Train
        worker (one DDP rank) takes an equal share of every batch."""
        workers = self.train.num_workers
        if not self.is_ray or batch_size % workers == 0:
            return None
        return (f"params:{group}.batch_size = {batch_size} does not split over "
                f"params:engine.train.num_workers = {workers} Ray workers: give a multiple of "
                f"{workers}")


def engine_config(params: Any) -> EngineConfig:
    """``params:engine``: a mapping, or just the backend's name (``"ray"``);
    None (a node called without it) is ``local``."""
    if params is None:
        return EngineConfig()
    if isinstance(params, str):
        params = {"backend": params}
    return from_params(EngineConfig, params, "engine")


__all__ = ["EngineConfig", "RayInferenceSettings", "RayTrainSettings", "engine_config"]
