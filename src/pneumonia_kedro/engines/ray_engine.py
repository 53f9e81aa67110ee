"""The heavy work on a Ray cluster: the cache build as decoding tasks, training on Ray Train's
``TorchTrainer`` (the same per-rank function as local DDP), batch prediction on Ray Data.

Each function does what its local counterpart does and returns the same thing, so the nodes
switch on ``engine.backend`` and nothing downstream changes:

- ``decoded_on_ray``: ``imagecache.decoding._decoded_in_workers`` with Ray tasks instead of a
  process pool. Workers only decode; the Kedro process writes each chunk as it comes (the
  same ``write_chunk``), so the cache is byte for byte the local one and an interrupted build
  resumes after its last written chunk.
- ``fit_on_ray``: ``training.fit._train_process`` run by every Ray Train worker; Ray Train
  joins the process group (gloo on CPUs, NCCL on GPUs). Rank 0 checkpoints every epoch into
  the run's storage; a lost worker restarts the group (``FailureConfig``) and every rank
  resumes from the last finished epoch. The epoch logger runs on rank 0 and logs each epoch
  once, also across restarts.
- ``predict_on_ray``: a Ray Data dataset of the local run's batch indexes, mapped by a pool
  of actors that each build the ensemble once and read the memory-mapped cache; the unfused
  boxes are put back in input order and finished by the same ``postprocessed``, so the
  predictions equal the local ones.

Cross-validation folds train at the same time when Kedro's ``ThreadRunner`` runs their nodes:
each node's thread submits its own ``TorchTrainer`` (Ray Train v2 runs a controller actor per
``fit``), Ray places both jobs' workers, and each fold logs into its own MLflow child run
(``FoldRunsHook``) and checkpoints into its own folder. ``connect`` is locked for them,
and starts or joins Ray from a thread of its own: a local Ray then outlives the runner's
threads and ends with the process (``_LastingInit``).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, replace
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from pneumonia_kedro.engines import EngineConfig
from pneumonia_kedro.imagecache import CacheChunk, ImageCache
from pneumonia_kedro.imagecache.decoding import CachePlan, _decode_rows
from pneumonia_kedro.training.checkpoints import CheckpointStore
from pneumonia_kedro.training.engine import EpochCallback, FitSettings, TrainingTask
from pneumonia_kedro.training.fit import TrainingResult, _train_process

logger = logging.getLogger(__name__)
_CONNECTING = threading.Lock()  # fold nodes run side by side (ThreadRunner) connect at once


def connect(engine: EngineConfig) -> None:
    """Join the cluster of ``engine.address`` (``auto``, ``ray://...``), or start a Ray on
    this machine when it is empty; a Ray already connected (a test's cluster, an earlier
    node of the run) is used as it is.

    ``ray.init`` runs in a thread of its own that lasts as long as this process, whichever
    thread the node runs in (``_LastingInit``)."""
    with _CONNECTING:
        if ray.is_initialized():
            return
        if engine.address:
            logger.info("connecting to the Ray cluster at %s", engine.address)
            _init_in_a_lasting_thread(address=engine.address, log_to_driver=False)
            return
        logger.info("starting a local Ray (%s CPUs)", engine.num_cpus or "all")
        _init_in_a_lasting_thread(  # "local": never a cluster RAY_ADDRESS points at
            address="local", num_cpus=engine.num_cpus,
            object_store_memory=engine.object_store_memory,
            include_dashboard=False, log_to_driver=False)


class _LastingInit:
    """``ray.init(**kwargs)`` in a daemon thread that lives until this process exits.

    A local Ray's processes (GCS, raylet) are started with ``PR_SET_PDEATHSIG``, which
    Linux ties to the thread that started them, not the process: started from a
    ``ThreadRunner`` worker, they were SIGKILLed when the runner's pool ended, before
    ``ray.shutdown`` at exit, leaving the raylet's dashboard and runtime-env agents
    running (and a dead Ray to any later run in the process). From this thread they end
    by Ray's own exit handler. In the main thread ``ray.init`` also replaced the SIGTERM
    handler (``InterruptedRunHook``'s, which marks the MLflow run KILLED) with
    ``sys.exit``; from any other thread it leaves it alone."""

    def __init__(self) -> None:
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def __call__(self, **kwargs: object) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._serve, name="ray-init", daemon=True)
            self.thread.start()
        done: Future = Future()
        self.requests.put((kwargs, done))
        done.result()

    def _serve(self) -> None:
        while True:
            kwargs, done = self.requests.get()
            try:
                ray.init(**kwargs)
            except BaseException as error:  # raised in the node's thread
                done.set_exception(error)
            else:
                done.set_result(None)


_init_in_a_lasting_thread = _LastingInit()


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _cause(error: ray.exceptions.RayTaskError) -> BaseException:
    """The exception a task raised (a DicomError names the file), without Ray's wrapper."""
    return getattr(error, "cause", None) or error


# ---------------------------------------------------------------------------------------------
# The cache build


@ray.remote(num_cpus=1)
def _decode_task(plan_ref: CachePlan, rows: list[tuple[int, str]]) -> CacheChunk:
    return _decode_rows(plan_ref.folder, rows, plan_ref.config)


def decoded_on_ray(cache_plan: CachePlan, chunks: list[list[tuple[int, str]]],
                   engine: EngineConfig) -> Iterator[CacheChunk]:
    """Chunks decoded by Ray tasks anywhere on the cluster, in the order they finish. A few
    are in flight at a time (``engine.cache_tasks``, by default twice the cluster's CPUs), so
    the object store holds a few chunks' pixels, not the cache. Every node must read the
    DICOM folder (a shared path or an fsspec URL); a lost task is retried by Ray."""
    connect(engine)
    plan_ref = ray.put(cache_plan)  # the folder's file index travels once, not per task
    in_flight = engine.cache_tasks or 2 * _cluster_cpus()
    waiting = iter(chunks)
    running = [_decode_task.remote(plan_ref, rows) for rows in islice(waiting, in_flight)]
    try:
        while running:
            done, running = ray.wait(running, num_returns=1)
            try:
                chunk = ray.get(done[0])
            except ray.exceptions.RayTaskError as error:
                raise _cause(error) from None
            running += [_decode_task.remote(plan_ref, rows) for rows in islice(waiting, 1)]
            yield chunk
    finally:
        for ref in running:
            ray.cancel(ref)


# ---------------------------------------------------------------------------------------------
# Training


class _EachEpochOnce:
    """The epoch callback, called at most once per epoch across worker-group restarts: a
    restarted rank 0 replays the resumed history (which a new local run wants), but these
    epochs are already in this run's MLflow run. A marker per logged epoch in the run's
    storage remembers them."""

    def __init__(self, callback: EpochCallback, folder: str) -> None:
        self.callback, self.folder = callback, folder

    def __call__(self, metrics: dict, epoch: int) -> None:
        marker = Path(self.folder) / f"epoch_{epoch}"
        if marker.exists():
            return
        self.callback(metrics, epoch)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: the local DDP per-rank function, then rank 0 hands its result
    back as a Ray Train checkpoint (written to the run's storage)."""
    from ray import train

    if Path(config["cwd"]).is_dir():
        # Ray Train starts workers in its own run folder; the project's relative paths
        # (caches, checkpoints, sqlite:///mlflow.db) are the driver's.
        os.chdir(config["cwd"])
    context = train.get_context()
    rank = context.get_world_rank()
    with tempfile.TemporaryDirectory() as folder:
        result_file = os.path.join(folder, "result.pt")
        result = _train_process(rank, config["task"], config["settings"], config["fold"],
                                config["checkpoints"], config["on_epoch_end"], result_file, 0)
        if result is not None:
            torch.save(asdict(result), result_file)
        train.report({"epochs": config["settings"].epochs},
                     checkpoint=train.Checkpoint.from_directory(folder) if rank == 0 else None)


def _storage(engine: EngineConfig) -> str:
    """Ray Train wants an absolute path (``EngineConfig`` refuses URLs)."""
    return str(Path(engine.storage).resolve())


def fit_on_ray(task: TrainingTask, settings: FitSettings, checkpoints: CheckpointStore | None,
               on_epoch_end: EpochCallback | None, fold: int | None, engine: EngineConfig
               ) -> TrainingResult:
    """Train ``task`` on ``engine.train.num_workers`` Ray Train workers (DDP ranks), each
    running ``training.fit._train_process``; the result of ``fit_task``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect(engine)
    scaling = engine.train
    if problem := engine.batch_split_problem(settings.batch_size, task.params):
        raise ValueError(problem)
    settings = replace(settings, world_size=scaling.num_workers)
    use_gpu = scaling.gpus_per_worker > 0
    storage = _storage(engine)
    # Named by the task's parameter group (train, classifier): task.name is the progress
    # bar's word ("classifier epoch"), a space in the run folder's path.
    name = f"{task.params}{'' if fold is None else f'-fold_{fold}'}-{uuid.uuid4().hex[:8]}"
    run_folder = os.path.join(storage, name)
    if checkpoints is None:
        # Without a checkpoint folder a restarted group still resumes: this run's own store.
        checkpoints = CheckpointStore(os.path.join(run_folder, "checkpoints"))
    callback = _EachEpochOnce(on_epoch_end, os.path.join(run_folder, "logged")) \
        if on_epoch_end is not None else None
    resources = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"task": task, "settings": settings, "fold": fold,
                           "checkpoints": checkpoints, "on_epoch_end": callback,
                           "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    logger.info("training (params:%s) on Ray Train: %d workers, %s CPU and %s GPU each; run "
                "storage %s", task.params, scaling.num_workers, scaling.cpus_per_worker,
                scaling.gpus_per_worker, run_folder)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} ended without a result: {result.error}")
    with result.checkpoint.as_directory() as folder:
        return TrainingResult(**torch.load(Path(folder) / "result.pt", weights_only=True))


# ---------------------------------------------------------------------------------------------
# Prediction on Ray Data


def _actors_that_fit(settings: object) -> int:
    """As many actors as the cluster's CPUs (and GPUs, when each takes some) hold at once."""
    resources = ray.cluster_resources()
    fits = [int(resources.get("CPU", 1) // settings.cpus_per_actor)
            if settings.cpus_per_actor else _cluster_cpus()]
    if settings.gpus_per_actor:
        fits.append(int(resources.get("GPU", 0) // settings.gpus_per_actor))
    return max(1, min(fits))


class EnsemblePredictor:
    """A Ray Data actor: builds the ensemble's networks once, lists the cache's usable images
    once (their pixels stay in the memory map until a batch reads them), then predicts whole
    batches by index: batch ``i`` is the local run's ``i``-th batch, so its boxes are too."""

    def __init__(self, ensemble_ref: ray.ObjectRef, cache: ImageCache, tta: object,
                 batch_size: int, device: str) -> None:
        from pneumonia_kedro.inference import cached_squares
        from pneumonia_kedro.training.config import resolve_device

        # A reference, not the ensemble: the weights travel once per actor, and Ray Data
        # keys the actor's constructor arguments by their hash or repr.
        self.networks = ray.get(ensemble_ref).build(resolve_device(device))
        self.squares = cached_squares(cache)
        self.tta, self.batch_size = tta, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pneumonia_kedro.prediction import predict

        predictions = np.empty(len(batch["batch"]), dtype=object)
        for slot, index in enumerate(batch["batch"]):
            start = int(index) * self.batch_size
            predictions[slot] = predict(self.networks,
                                        self.squares[start:start + self.batch_size],
                                        self.tta, None, self.batch_size)
        return {"batch": batch["batch"], "prediction": predictions}


def predict_on_ray(ensemble: object, cache: ImageCache, tta: object, postprocess: object,
                   batch_size: int, device: str, engine: EngineConfig,
                   progress: bool = False) -> object:
    """``prediction.predict`` of the cache's usable images, post-processed, on Ray Data: the
    batch indexes mapped (``map_batches``) by a pool of ``engine.inference.actors`` actors
    (``EnsemblePredictor``; every node must read the cache). Each batch holds the local
    run's images, so the unfused boxes, and what the post-processing makes of them, equal
    the local prediction."""
    import ray.data

    from pneumonia_kedro.prediction import Prediction, postprocessed, predict

    connect(engine)
    ids = cache.usable["patientId"].tolist()
    batches = math.ceil(len(ids) / batch_size)
    if not batches:  # nothing usable: the local path's empty prediction
        return predict(ensemble.build("cpu"), [], tta, postprocess, batch_size)
    settings = engine.inference
    actors = min(batches, settings.actors or _actors_that_fit(settings))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    # A failed batch raises the predictor's own error (a DicomError, a CUDA error), not Ray
    # Data's "UDF failed to process a data block".
    context.raise_original_map_exception = True
    # Held here until every batch is predicted: a restarted actor fetches the weights again.
    ensemble_ref = ray.put(ensemble)
    predicted = ray.data.from_items(
        [{"batch": index} for index in range(batches)], override_num_blocks=batches,
    ).map_batches(
        EnsemblePredictor, batch_size=1,
        fn_constructor_args=(ensemble_ref, cache, tta, batch_size, device),
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor or None)
    logger.info("predicting %d images in %d batches on Ray Data, %d actors", len(ids),
                batches, actors)
    try:
        rows = predicted.take_all()
    except ray.exceptions.RayTaskError as error:
        raise _cause(error) from None
    parts = [row["prediction"] for row in sorted(rows, key=lambda row: row["batch"])]
    variants = pd.concat([part.variants for part in parts], ignore_index=True)
    classifier_p = pd.concat([part.classifier_probability for part in parts]) \
        if parts[0].classifier_probability is not None else None
    prediction = Prediction(ids, variants, classifier_p)
    prediction.boxes, prediction.candidates, prediction.image_probability = postprocessed(
        variants, tta, postprocess, classifier_p, ids)
    return prediction
