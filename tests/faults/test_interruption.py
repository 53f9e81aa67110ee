"""`kedro run` killed with SIGKILL at a random point during the cache build and during
training, then run again, ends exactly where an uninterrupted run ends; a failed run is marked
FAILED in MLflow with its error and leaves earlier catalog versions intact; a run stopped with
Ctrl-C is KILLED in MLflow, and the next run says it resumed (Ctrl-C inside an SQLite write:
tests/test_hooks.py).

The kill points are random; each test prints its seed, and KILL_SEED=<seed> repeats it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import DEMO_RAW, run_session, tiny_demo_project

KEDRO = str(Path(sys.executable).with_name("kedro"))
TINY_TRAINING = {
    "split": {"validation_fraction": 0.25, "stratify_by_view": False, "seed": 1},
    "model": {"architecture": "mobilenet_v3_large_fpn", "image_size": 64,
              "anchor_sizes": [[8, 16, 32, 64]] * 3, "anchor_reference_size": None,
              "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
              "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
              "box_batch_size_per_image": 16, "box_head_size": 32, "box_detections_per_img": 5},
    "train": {"epochs": 6, "batch_size": 4, "validation_batch_size": 4, "warmup_iterations": 1,
              "num_workers": 0, "progress": False},
}


def seeded_random() -> random.Random:
    """A random source whose seed is printed (pytest shows it with a failure)."""
    seed = int(os.environ.get("KILL_SEED", random.randrange(2**32)))
    print(f"kill points from seed {seed}; KILL_SEED={seed} repeats them")
    return random.Random(seed)


def demo_project(root: Path, params: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project copy with the tiny demo data and a `kedro run --config` file of ``params``;
    its runs (and those started as subprocesses) track to its own SQLite store."""
    project = tiny_demo_project(root, monkeypatch)
    (project / "run.yml").write_text(yaml.safe_dump({"run": {"env": "demo", "params": params}}))
    return project


def kedro_run(project: Path, *args: str, params: dict | None = None) -> subprocess.Popen:
    """`kedro run --config run.yml ARGS` in its own process group (the cache's workers too).

    ``params`` are merged into the config file's: `--params` would replace them all.
    """
    config = "run.yml"
    if params:
        run = yaml.safe_load((project / "run.yml").read_text())
        for group, values in params.items():
            run["run"]["params"].setdefault(group, {}).update(values)
        config = "run-override.yml"
        (project / config).write_text(yaml.safe_dump(run))
    # Wide columns: Rich would otherwise wrap log lines mid-phrase.
    environment = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1",
                   "COLUMNS": "400"}
    log = open(project / "kedro.log", "a")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([KEDRO, "run", "--config", config, *args], cwd=project,
                               env=environment, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    process.log_start = log.tell()  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen, project: Path) -> str:
    """Wait for ``process``; return what this run wrote to the log, whitespace collapsed
    (Rich wraps log lines)."""
    process.wait(timeout=600)
    with open(project / "kedro.log") as log:
        log.seek(process.log_start)
        return " ".join(log.read().split())


def kill_when(process: subprocess.Popen, ready, delay: float, project: Path) -> None:
    """SIGKILL the run's whole process group ``delay`` seconds after ``ready()`` holds."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, (project / "kedro.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.005)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def copy_patients(project: Path, copies: int) -> int:
    """Grow the demo's training set with byte copies of its DICOMs under new patientIds."""
    images = project / DEMO_RAW / "stage_2_train_images"
    originals = sorted(images.glob("*.dcm"))
    labels = pd.read_csv(project / DEMO_RAW / "stage_2_train_labels.csv")
    classes = pd.read_csv(project / DEMO_RAW / "stage_2_detailed_class_info.csv")
    grown_labels, grown_classes = [labels], [classes]
    for copy in range(copies):
        suffix = f"-copy{copy:03d}"
        for path in originals:
            shutil.copyfile(path, images / f"{path.stem}{suffix}.dcm")
        grown_labels.append(labels.assign(patientId=labels["patientId"] + suffix))
        grown_classes.append(classes.assign(patientId=classes["patientId"] + suffix))
    pd.concat(grown_labels).to_csv(project / DEMO_RAW / "stage_2_train_labels.csv", index=False)
    pd.concat(grown_classes).to_csv(project / DEMO_RAW / "stage_2_detailed_class_info.csv",
                                    index=False)
    return len(originals) * (copies + 1)


@pytest.mark.slow
def test_cache_build_killed_at_a_random_point_resumes_to_the_uninterrupted_cache(tmp_path,
                                                                              monkeypatch):
    rng = seeded_random()
    params = {"split": {"stratify_by_view": False},
              "cache": {"image_size": 512, "workers": 2, "chunk_size": 2, "progress": False}}
    project = demo_project(tmp_path, params, monkeypatch)
    n_patients = copy_patients(project, copies=24)
    run_session(project, pipelines=["ingest", "split"], params=params)
    caches = project / "data/04_feature/demo/image_cache"

    def chunks_done() -> int:
        return sum(len(list((caches / name / "records").glob("*.json")))
                   for name in ("train", "validation") if (caches / name / "records").is_dir())

    kill_point = rng.randint(2, 40)  # of 200 chunks
    process = kedro_run(project, "--pipelines", "cache")
    kill_when(process, lambda: chunks_done() >= kill_point, rng.uniform(0, 0.05), project)
    manifests = [caches / name / "manifest.json" for name in ("train", "validation")]
    assert not all(m.is_file() and '"complete": true' in m.read_text() for m in manifests), \
        "the kill came after the build had finished"

    log = finish(kedro_run(project, "--pipelines", "cache"), project)
    assert "Pipeline execution completed successfully" in log, log[-3000:]
    assert "images to decode" in log
    resumed = {name: (np.load(caches / name / "images.npy"),
                      pd.read_parquet(caches / name / "index.parquet"))
               for name in ("train", "validation")}
    assert sum(len(index) for _, index in resumed.values()) == n_patients

    shutil.rmtree(caches)
    log = finish(kedro_run(project, "--pipelines", "cache"), project)
    assert "Pipeline execution completed successfully" in log, log[-3000:]
    for name, (images, index) in resumed.items():
        np.testing.assert_array_equal(images, np.load(caches / name / "images.npy"))
        pd.testing.assert_frame_equal(index, pd.read_parquet(caches / name / "index.parquet"))
    assert not list(caches.rglob("*.partial*"))


def model_versions(project: Path) -> list[Path]:
    return sorted((project / "data/06_models/demo/trained_model.pt").glob("*/trained_model.pt"))


def load_weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_training_killed_at_a_random_point_resumes_to_the_uninterrupted_model(tmp_path,
                                                                             monkeypatch):
    rng = seeded_random()
    params = {**TINY_TRAINING, "cache": {"image_size": 64, "workers": 0, "progress": False}}
    project = demo_project(tmp_path, params, monkeypatch)
    run_session(project, pipelines=["ingest", "split", "cache"], params=params)
    checkpoints = project / "data/06_models/demo/checkpoints"

    process = kedro_run(project, "--pipelines", "train")
    kill_when(process, (checkpoints / "last.pt").is_file, rng.uniform(0, 0.5), project)
    assert model_versions(project) == [], "the kill came after training had finished"
    killed_after = torch.load(checkpoints / "last.pt", weights_only=True)["epoch"] + 1
    assert killed_after < TINY_TRAINING["train"]["epochs"]

    log = finish(kedro_run(project, "--pipelines", "train"), project)
    assert "Pipeline execution completed successfully" in log, log[-3000:]
    assert f"resuming after epoch {killed_after} of 6" in log
    history = pd.read_csv(project / "data/08_reporting/demo/training_history.csv")
    (resumed,) = model_versions(project)

    resumed_last = torch.load(checkpoints / "last.pt", weights_only=True)["model"]
    log = finish(kedro_run(project, "--pipelines", "train", params={"train": {"resume": False}}),
                 project)
    assert "Pipeline execution completed successfully" in log, log[-3000:]
    assert "resuming" not in log
    uninterrupted = model_versions(project)[-1]
    # The best epoch's weights (the catalog model) and the last epoch's (the checkpoint).
    reference_last = torch.load(checkpoints / "last.pt", weights_only=True)["model"]
    for reference, weights in ((load_weights(uninterrupted), load_weights(resumed)),
                               (reference_last, resumed_last)):
        assert reference.keys() == weights.keys()
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
    timing = ["images_per_second", "data_wait_share"]
    replayed = history.pop("resumed_from_checkpoint")
    assert replayed.tolist() == [epoch <= killed_after for epoch in history["epoch"]]
    uninterrupted_history = pd.read_csv(project / "data/08_reporting/demo/training_history.csv")
    assert not uninterrupted_history.pop("resumed_from_checkpoint").any()
    pd.testing.assert_frame_equal(history.drop(columns=timing),
                                  uninterrupted_history.drop(columns=timing))

    # The resumed run's MLflow curve holds every epoch, the replayed ones included.
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["pneumonia-kedro"], order_by=["start_time"])
    resumed_run = runs.iloc[-2]["run_id"]
    curve = client.get_metric_history(resumed_run, "validation_competition_metric")
    assert sorted(m.step for m in curve) == list(range(1, 7))
    resumed_metrics = client.get_run(resumed_run).data.metrics
    assert resumed_metrics["training.resumed_after_epoch"] == killed_after
    # The run with train.resume false trained from scratch and says so.
    scratch_metrics = client.get_run(runs.iloc[-1]["run_id"]).data.metrics
    assert "training.resumed_after_epoch" not in scratch_metrics
    assert scratch_metrics["training.best_epoch"] == resumed_metrics["training.best_epoch"]

    # A run that fails is FAILED in MLflow with its error; earlier versions stay as they were.
    before = {path: path.read_bytes() for path in model_versions(project)}
    before_history = (project / "data/08_reporting/demo/training_history.csv").read_bytes()
    log = finish(kedro_run(project, "--pipelines", "train", params={
        "train": {"learning_rate": 1.0e12, "grad_clip_norm": None}}), project)
    assert "lower the learning rate" in log
    assert {path: path.read_bytes() for path in model_versions(project)} == before
    assert (project / "data/08_reporting/demo/training_history.csv").read_bytes() == \
        before_history
    failed = mlflow.search_runs(experiment_names=["pneumonia-kedro"],
                                order_by=["start_time DESC"]).iloc[0]
    assert failed["status"] == "FAILED"
    assert failed["tags.error.node"] == "train_detector_node"
    assert failed["tags.error.message"].startswith("FloatingPointError: loss is")


@pytest.mark.slow
def test_ctrl_c_marks_the_mlflow_run_killed_and_the_next_run_says_it_resumed(tmp_path,
                                                                            monkeypatch):
    params = {**TINY_TRAINING, "cache": {"image_size": 64, "workers": 0, "progress": False}}
    project = demo_project(tmp_path, params, monkeypatch)
    run_session(project, pipelines=["ingest", "split", "cache"], params=params)
    checkpoints = project / "data/06_models/demo/checkpoints"

    process = kedro_run(project, "--pipelines", "train")
    deadline = time.monotonic() + 300
    while not (checkpoints / "last.pt").is_file():
        assert process.poll() is None and time.monotonic() < deadline, \
            (project / "kedro.log").read_text()[-3000:]
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
    finish(process, project)
    assert process.returncode != 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    interrupted = mlflow.search_runs(experiment_names=["pneumonia-kedro"],
                                     order_by=["start_time DESC"]).iloc[0]
    assert interrupted["status"] == "KILLED"  # it was FINISHED, with a partial curve
    assert interrupted["tags.interrupted"] == "SIGINT"
    assert model_versions(project) == []
    done = torch.load(checkpoints / "last.pt", weights_only=True)["epoch"] + 1

    log = finish(kedro_run(project, "--pipelines", "train"), project)
    assert "Pipeline execution completed successfully" in log, log[-3000:]
    history = pd.read_csv(project / "data/08_reporting/demo/training_history.csv")
    assert history["resumed_from_checkpoint"].tolist() == [
        epoch <= done for epoch in history["epoch"]]
    resumed = mlflow.search_runs(experiment_names=["pneumonia-kedro"],
                                 order_by=["start_time DESC"]).iloc[0]
    assert resumed["status"] == "FINISHED"
    assert resumed["metrics.training.resumed_after_epoch"] == done
    assert "tags.resumed_after_epoch" not in resumed  # a metric now, not a tag

