"""engine: ray on a real two-node Ray cluster (two raylets on 127.0.0.1, one CPU each): the
cache build, Ray Train and prediction equal their local counterparts; a training whose worker
is killed mid-epoch still ends with every epoch and a valid model, its curves logged once."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pneumonia_kedro.config import ConfigError
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.engines import EngineConfig, RayTrainSettings, engine_config
from pneumonia_kedro.ensemble import Ensemble
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, decode_chunks, plan
from pneumonia_kedro.imagecache.files import read_state, write_chunk
from pneumonia_kedro.models import TrainedModel, build_model
from pneumonia_kedro.pipelines.inference.nodes import predict_test
from pneumonia_kedro.submission import build_submission
from pneumonia_kedro.training import (
    AugmentConfig,
    CachedDetectionDataset,
    MlflowEpochLogger,
    train_model,
)
from tests.conftest import PROJECT_ROOT, write_demo_dicoms
from tests.test_training import TINY_MODEL, TINY_TRAIN, assert_same_weights

ray = pytest.importorskip("ray", reason="the ray extra: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow

SIZE = 64
OBJECT_STORE = 200 * 1024**2  # per node: this machine is shared
# Two nodes of one CPU: two tasks or two Ray Train workers must use both nodes.
ENGINE = EngineConfig(backend="ray", address="auto", cache_tasks=0,
                      train=RayTrainSettings(num_workers=2, max_failures=3))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Started once for the module and always shut down."""
    from ray.cluster_utils import Cluster

    # Workers unpickle test helpers (tests.test_ray) by module name.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), previous]))
    node = {"num_cpus": 1, "object_store_memory": OBJECT_STORE, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        cluster.add_node(**{k: v for k, v in node.items() if k != "include_dashboard"})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[DicomFolder, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("ray_dicoms")
    patients = write_demo_dicoms(folder, n_positive=4, n_negative=4, seed=5)
    return DicomFolder.scan(str(folder)), patients


@pytest.fixture(scope="module")
def dicoms(demo) -> DicomFolder:
    return demo[0]


@pytest.fixture(scope="module")
def patients(demo) -> pd.DataFrame:
    return demo[1]


def _cache_plan(dicoms: DicomFolder):
    config = CacheConfig(image_size=SIZE, workers=0, chunk_size=2, progress=False)
    return plan(dicoms, dicoms.patient_ids, config)


def _same_cache(a: Path, b: Path) -> None:
    """Byte for byte: the image array file and the index."""
    assert (a / "images.npy").read_bytes() == (b / "images.npy").read_bytes()
    pd.testing.assert_frame_equal(ImageCache(a).index, ImageCache(b).index)


def test_engine_setting_is_local_by_default_and_accepts_a_name():
    assert not engine_config(None).is_ray and not EngineConfig().is_ray
    assert engine_config("ray").is_ray
    assert engine_config({"backend": "ray", "address": "auto"}).address == "auto"
    with pytest.raises(Exception, match="backend"):
        engine_config({"backend": "spark"})
    # The run storage holds files (checkpoints, epoch markers): a URL became a folder "s3:".
    with pytest.raises(ConfigError, match=r"params:engine.storage = 's3://bucket/runs' is a "
                                          "URL, but the training writes"):
        engine_config({"backend": "ray", "storage": "s3://bucket/runs"})
    assert engine_config({"storage": "file:///shared/runs"}).storage == "/shared/runs"


def test_the_local_engine_imports_no_ray():
    import subprocess
    import sys

    code = ("import sys\n"
            "from pneumonia_kedro.pipelines import cache, classify, inference, train\n"
            "from pneumonia_kedro.pipelines import cross_validation\n"
            "from pneumonia_kedro.engines import engine_config\n"
            "for module in (cache, classify, inference, train): module.create_pipeline()\n"
            "cross_validation.create_pipeline(folds=2)\n"
            "engine_config(None)\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PROJECT_ROOT)
    assert out.stdout.strip().splitlines()[-1] == "False"


# A process whose node thread (a ThreadRunner worker) starts the local Ray and then ends.
LOCAL_RAY_FROM_A_NODE_THREAD = """
import json, os, signal, threading
import ray
from pneumonia_kedro.engines import EngineConfig
from pneumonia_kedro.engines.ray_engine import connect

def descendants(pid):
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                children.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry))
        except OSError:
            pass
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found

def on_sigterm(signum, frame):
    pass

signal.signal(signal.SIGTERM, on_sigterm)
engine = EngineConfig(backend="ray", num_cpus=1, object_store_memory=OBJECT_STORE)
node = threading.Thread(target=connect, args=(engine,))
node.start()
node.join()
assert ray.get(ray.remote(lambda: 1).remote(), timeout=120) == 1, "the Ray died with the thread"
assert signal.getsignal(signal.SIGTERM) is on_sigterm, "ray.init replaced the SIGTERM handler"
print(json.dumps(descendants(os.getpid())))
""".replace("OBJECT_STORE", str(OBJECT_STORE))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
def test_a_local_ray_started_in_a_node_thread_outlives_it_and_ends_with_the_process():
    """``FOLDS=k kedro run --runner ThreadRunner --params engine.backend=ray``: the node that
    starts the local Ray runs in a pool thread. Its processes were tied to that thread
    (PR_SET_PDEATHSIG), SIGKILLed when the pool ended, and left the raylet's agents running
    after ``kedro run`` exited; ray.init also took over the SIGTERM handler that marks an
    interrupted MLflow run KILLED."""
    import json
    import subprocess
    import sys
    import tempfile

    # Its own Ray folder: a local Ray, not this module's cluster (ray_current_cluster).
    with tempfile.TemporaryDirectory(prefix="ray") as ray_tmp:  # short: Ray's socket paths
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run([sys.executable, "-c", LOCAL_RAY_FROM_A_NODE_THREAD],
                             capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                             check=False, env={**env, "RAY_TMPDIR": ray_tmp})
        assert out.returncode == 0, out.stderr[-3000:]
        started = json.loads(out.stdout.strip().splitlines()[-1])
        assert started  # the GCS, the raylet and its agents
        deadline = time.monotonic() + 60
        while (left := [pid for pid in started if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # not for the next test to meet
            os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray processes left behind: {left}"


def test_cache_built_on_the_cluster_equals_the_local_build(cluster, dicoms, tmp_path):
    build(_cache_plan(dicoms), tmp_path / "local")
    figures = build(_cache_plan(dicoms), tmp_path / "ray", ENGINE)
    assert figures["decoded"] == 8
    _same_cache(tmp_path / "local", tmp_path / "ray")


def test_an_interrupted_build_on_the_cluster_resumes_to_the_same_cache(cluster, dicoms,
                                                                       tmp_path):
    build(_cache_plan(dicoms), tmp_path / "local")
    target = tmp_path / "ray"
    chunks = decode_chunks(_cache_plan(dicoms), read_state(target), ENGINE)
    for _ in range(3):  # the manifest, then two chunks of two images: then the run dies
        write_chunk(target, next(chunks))
    chunks.close()  # cancels the tasks still in flight
    figures = build(_cache_plan(dicoms), target, ENGINE)
    assert (figures["reused"], figures["decoded"]) == (4, 4)
    _same_cache(tmp_path / "local", target)


def test_a_sharded_cache_built_on_the_cluster_equals_the_local_build(cluster, dicoms,
                                                                     tmp_path):
    """Parts of 3 (3 + 3 + 2 images): chunks finish on either node in any order, each is
    written into its part, a part is finished after its last chunk; killed after the first
    part, the build resumes with that part reused."""
    build(_cache_plan(dicoms), tmp_path / "local")
    in_parts = _cache_plan(dicoms)
    in_parts.config = replace(in_parts.config, shard_size=3)
    target = tmp_path / "ray"
    chunks = decode_chunks(in_parts, read_state(target), ENGINE)
    for chunk in chunks:
        write_chunk(target, chunk)
        if chunk.build is not None:  # the first part finished: then the run dies
            break
    chunks.close()
    figures = build(in_parts, target, ENGINE)
    assert figures["decoded"] + figures["reused"] == 8 and figures["reused"] in (2, 3)
    sharded, local = ImageCache(target), ImageCache(tmp_path / "local")
    np.testing.assert_array_equal(np.asarray(sharded.images), local.images)
    pd.testing.assert_frame_equal(sharded.index, local.index)
    for part, rows in enumerate(((0, 3), (3, 6), (6, 8))):
        np.testing.assert_array_equal(ImageCache(target / f"part-0000{part}").images,
                                      local.images[slice(*rows)])


@pytest.fixture(scope="module")
def tiny_cache(dicoms, tmp_path_factory) -> ImageCache:
    path = tmp_path_factory.mktemp("ray_cache") / "all"
    build(_cache_plan(dicoms), path)
    return ImageCache(path)


NO_AUGMENT = AugmentConfig(horizontal_flip=0.0, scale=(1.0, 1.0), translate=0.0,
                           brightness=0.0, contrast=0.0)
# Frozen BatchNorm: on the CPU (gloo) there is no SyncBatchNorm (as in test_training).
MODEL = replace(TINY_MODEL, freeze_batchnorm=True)


def _datasets(cache: ImageCache, patients: pd.DataFrame, train_cls=CachedDetectionDataset):
    return (train_cls(cache, patients, "empty", NO_AUGMENT),
            CachedDetectionDataset(cache, patients))


def _logged_epochs(tracking_uri: str, run_id: str) -> list[int]:
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "train_loss")
    return sorted(metric.step for metric in history)


def test_one_epoch_on_two_ray_workers_equals_two_local_ddp_processes(cluster, tiny_cache,
                                                                     patients, tmp_path):
    train_data, validation_data = _datasets(tiny_cache, patients)
    config = replace(TINY_TRAIN, epochs=1, batch_size=4, augment=NO_AUGMENT)
    local = train_model(MODEL, replace(config, world_size=2), train_data, validation_data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        logger = MlflowEpochLogger(uri, run.info.run_id)
        on_ray = train_model(MODEL, config, train_data, validation_data, on_epoch_end=logger,
                             engine=replace(ENGINE, storage=str(tmp_path / "ray")))
    assert_same_weights(local.last_state, on_ray.last_state, atol=1e-5)
    assert on_ray.history[0]["train_loss"] == pytest.approx(local.history[0]["train_loss"],
                                                            rel=1e-5)
    assert _logged_epochs(uri, run.info.run_id) == [1]  # rank 0 logs, once
    # Ray Train's results and this run's checkpoints are in the run's storage.
    assert list((tmp_path / "ray").glob("*/checkpoints/last.pt"))


class KilledOnceMidEpoch(CachedDetectionDataset):
    """Kills the worker process loading it, once, during the second epoch (after the first
    epoch's checkpoint): a lost worker, as a dead machine would be."""

    def __init__(self, *args, marker: str, checkpoint: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.marker, self.checkpoint = marker, checkpoint

    def __getitems__(self, indices: list[int]) -> list:
        if Path(self.checkpoint).exists():
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitems__(indices)


def test_a_worker_killed_mid_epoch_and_the_training_still_ends(cluster, tiny_cache, patients,
                                                              tmp_path):
    from pneumonia_kedro.training import CheckpointStore

    checkpoints = CheckpointStore(tmp_path / "checkpoints")
    train_data, validation_data = _datasets(tiny_cache, patients)
    train_data = KilledOnceMidEpoch(tiny_cache, patients, "empty", NO_AUGMENT,
                                    marker=str(tmp_path / "killed"),
                                    checkpoint=str(checkpoints.last_file))
    config = replace(TINY_TRAIN, epochs=3, batch_size=4, augment=NO_AUGMENT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        result = train_model(MODEL, config, train_data, validation_data, checkpoints,
                             MlflowEpochLogger(uri, run.info.run_id),
                             engine=replace(ENGINE, storage=str(tmp_path / "ray")))
    assert (tmp_path / "killed").exists()  # a worker did die
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.resumed_after_epoch >= 1  # the restarted group resumed, not restarted
    assert _logged_epochs(uri, run.info.run_id) == [1, 2, 3]  # each epoch once
    model = build_model(MODEL)
    model.load_state_dict(result.best_state)
    assert all(torch.isfinite(v).all() for v in result.last_state.values()
               if v.is_floating_point())


class MeetsTheOtherFolds(CachedDetectionDataset):
    """A fold's training data that, at its first batch, marks the fold as training and waits
    until every fold has: the folds' epochs run at the same time, or this fails."""

    def __init__(self, *args, folder: str, fold: int, folds: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.folder, self.fold, self.folds = Path(folder), fold, folds

    def __getitems__(self, indices: list[int]) -> list:
        marker = self.folder / f"fold_{self.fold}"
        if not marker.exists():
            marker.touch()
            deadline = time.monotonic() + 180
            while len(list(self.folder.glob("fold_*"))) < self.folds:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fold {self.fold} trained alone: no other fold "
                                       "started its epoch within 180 s")
                time.sleep(0.05)
        return super().__getitems__(indices)


def _fold_training(train_data: CachedDetectionDataset,
                   validation_data: CachedDetectionDataset, logger: MlflowEpochLogger,
                   engine: EngineConfig, config, fold: int):
    return train_model(MODEL, config, train_data, validation_data, None, logger, fold, engine)


def test_folds_train_at_the_same_time_as_ray_jobs_under_the_thread_runner(
        cluster, tiny_cache, patients, tmp_path):
    """``--runner ThreadRunner`` with ``engine: ray``: each fold's node submits its own Ray
    Train job (one worker on each one-CPU node); both epochs run at once, each fold's curve
    lands in its own MLflow run, and the weights equal the folds trained one after another
    here."""
    from functools import partial, update_wrapper

    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Node, Pipeline
    from kedro.runner import ThreadRunner

    config = replace(TINY_TRAIN, epochs=1, batch_size=2, augment=NO_AUGMENT)
    engine = replace(ENGINE, storage=str(tmp_path / "ray"),
                     train=RayTrainSettings(num_workers=1, max_failures=0))
    halves = [patients.iloc[0::2], patients.iloc[1::2]]  # fold i trains on half i
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = mlflow.MlflowClient(uri).create_experiment("folds")
    runs = [mlflow.MlflowClient(uri).create_run(experiment).info.run_id for _ in halves]
    (tmp_path / "started").mkdir()
    datasets, nodes = {"engine": engine, "config": config}, []
    for fold, (train_patients, validation_patients) in enumerate([halves, halves[::-1]]):
        datasets |= {
            f"fold_{fold}.train": MeetsTheOtherFolds(
                tiny_cache, train_patients, "empty", NO_AUGMENT, folder=str(tmp_path / "started"),
                fold=fold, folds=2),
            f"fold_{fold}.validation": CachedDetectionDataset(tiny_cache, validation_patients),
            f"fold_{fold}.logger": MlflowEpochLogger(uri, runs[fold])}
        nodes.append(Node(update_wrapper(partial(_fold_training, fold=fold), _fold_training),
                          [f"fold_{fold}.train", f"fold_{fold}.validation",
                           f"fold_{fold}.logger", "engine", "config"],
                          f"fold_{fold}.result", name=f"fold_{fold}_train_node"))
    catalog = DataCatalog({name: MemoryDataset(value, copy_mode="assign")
                           for name, value in datasets.items()})
    outputs = ThreadRunner(max_workers=2).run(Pipeline(nodes), catalog)
    on_ray = [outputs[f"fold_{fold}.result"].load() for fold in (0, 1)]
    for fold, (train_patients, validation_patients) in enumerate([halves, halves[::-1]]):
        one_after_another = train_model(
            MODEL, config, CachedDetectionDataset(tiny_cache, train_patients, "empty", NO_AUGMENT),
            CachedDetectionDataset(tiny_cache, validation_patients), fold=fold)
        assert_same_weights(one_after_another.last_state, on_ray[fold].last_state, atol=1e-5)
        assert _logged_epochs(uri, runs[fold]) == [1]


POSTPROCESSING = {"score_threshold": 0.0, "nms_iou": 0.5, "max_boxes": 5, "shrink": 1.0}


def test_prediction_on_the_cluster_equals_the_local_one(cluster, tiny_cache):
    torch.manual_seed(0)
    detector = TrainedModel(config=replace(TINY_MODEL, image_size=SIZE),
                            state_dict=build_model(TINY_MODEL).state_dict(), info={})
    ensemble = Ensemble.of(detector, None)
    params = {"cache": {"workers": 0, "progress": False}, "progress": False, "batch_size": 3}
    tuned = {**POSTPROCESSING, "models": ensemble.record()}  # as if tuned for it
    local = predict_test(ensemble, tiny_cache, tuned, params)
    on_ray = predict_test(ensemble, tiny_cache, tuned, params,
                          {"backend": "ray", "address": "auto", "inference": {"actors": 2}})
    assert len(local) > 0
    pd.testing.assert_frame_equal(local, on_ray)
    ids = tiny_cache.index["patientId"].tolist()
    sizes = {pid: (1024, 1024) for pid in ids}
    np.testing.assert_array_equal(
        build_submission(local, ids, "empty", sizes).to_numpy(),
        build_submission(on_ray, ids, "empty", sizes).to_numpy())
