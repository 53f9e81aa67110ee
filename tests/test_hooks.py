"""The hooks and the pipeline registry, through real Kedro sessions and a real MLflow SQLite
store: a run that asks for another fold count than the registered pipelines is refused
before MLflow opens a run; the registry reads the fold count as Kedro reads configuration
without changing the run's own; the MLflow tags; the fold child runs' statuses; Ctrl-C,
even inside an SQLite write, ends the runs KILLED."""

from __future__ import annotations

import atexit
import os
import random
import signal
import threading
from pathlib import Path

import mlflow
import pytest
from kedro.framework.project import configure_project, pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.pipeline import Node, Pipeline

import pneumonia_kedro
from pneumonia_kedro.config import ConfigError
from pneumonia_kedro.errors import MissingDataError
from pneumonia_kedro.hooks import FoldRunsHook, InterruptedRunHook, MlflowRunTagsHook
from pneumonia_kedro.pipeline_registry import K_FOLDS, ON_PURPOSE, ONE_FOLD
from pneumonia_kedro.pipelines.folds import folds_in
from tests.conftest import run_session

PIPELINES = Path(pneumonia_kedro.__file__).parent / "pipelines"


@pytest.fixture
def register(kedro_project: Path, monkeypatch: pytest.MonkeyPatch):
    """``register(folds)``: the pipelines as Kedro registers them with ``FOLDS=folds`` (None:
    unset); afterwards they are registered anew from the configuration."""
    def registered(folds: int | str | None) -> dict[str, Pipeline]:
        if folds is None:
            monkeypatch.delenv("FOLDS", raising=False)
        else:
            monkeypatch.setenv("FOLDS", str(folds))
        bootstrap_project(kedro_project)  # forgets the pipelines registered before
        return dict(pipelines.items())

    monkeypatch.delenv("KEDRO_ENV", raising=False)
    yield registered
    configure_project("pneumonia_kedro")  # the next access registers without FOLDS


@pytest.fixture(autouse=True)
def _own_store(_temporary_mlflow_store: Path) -> None:
    """This test's SQLite store and an experiment in it, even after another test (or
    session) pointed mlflow elsewhere."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("hooks")


def _runs() -> list:
    return mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.search_experiments()])


def test_the_registry_holds_what_it_says_for_one_fold_and_for_k(register):
    one = register(None)
    # Every pipeline package is registered, and either `kedro run` runs it or it says why not.
    packages = {p.parent.name for p in PIPELINES.glob("*/pipeline.py")}
    assert set(one) == {"__default__", *ONE_FOLD, *ON_PURPOSE} == {"__default__", *packages} - {
        "cross_validation"}
    assert folds_in(one["__default__"]) == 1
    assert one["__default__"].nodes == sum((one[n] for n in ONE_FOLD), Pipeline([])).nodes
    three = register(3)
    assert set(three) == {"__default__", *K_FOLDS, "train", "classify", "evaluate", *ON_PURPOSE}
    assert folds_in(three["__default__"]) == folds_in(three["cross_validation"]) == 3
    assert three["__default__"].nodes == sum((three[n] for n in K_FOLDS), Pipeline([])).nodes
    names = {node.name for node in three["__default__"].nodes}
    assert {"fold_2.train_detector_node", "fold_0.train_classifier_node"} <= names
    assert "train_detector_node" not in names and "sample_demo_patients_node" not in names
    # inference fuses every fold's model
    assert {f"fold_{i}.trained_model" for i in range(3)} <= three["inference"].inputs()


def test_a_fold_count_that_is_not_a_whole_number_is_refused_by_name(register):
    with pytest.raises(ConfigError, match=r"split.folds = 'two' \(FOLDS='two'\)"):
        register("two")


def test_the_registry_leaves_the_run_s_environment_to_the_run(register, kedro_project):
    """The registry reads conf/local (no KEDRO_ENV); a demo run's catalog still reads the
    demo environment's globals (data/.../demo), though the registry loads in the middle."""
    register(2)
    with KedroSession.create(project_path=kedro_project, env="demo") as session:
        context = session.load_context()
        assert folds_in(pipelines["__default__"]) == 2
        assert context.params["split"]["folds"] == 2  # FOLDS, read by the run too
        catalog = context.catalog
    assert "/demo/" in str(catalog.get("train_patients")._describe()["filepath"])


@pytest.mark.parametrize(("folds", "params", "registered"), [
    (None, {"split": {"folds": 3}}, "registered for 1 fold"),
    (2, {"split": {"folds": 1}}, "registered for 2 folds"),
])
def test_a_run_that_differs_from_the_registered_fold_count_is_refused_before_mlflow(
        register, kedro_project, folds, params, registered):
    register(folds)
    want = params["split"]["folds"]
    with pytest.raises(ConfigError, match=registered) as info:
        run_session(kedro_project, env="demo", params=params)
    assert f"Ask for {want} fold" in str(info.value)
    assert f"`FOLDS={want} kedro run --env demo`" in str(info.value)
    assert _runs() == []  # refused before kedro-mlflow opened a run


def test_a_run_s_own_fold_count_that_is_not_a_whole_number_is_refused_by_name(
        register, kedro_project):
    register(None)
    with pytest.raises(ConfigError, match=r"params:split.folds = 'two': the number of"):
        run_session(kedro_project, env="demo", params={"split": {"folds": "two"}})


def test_missing_raw_data_is_refused_before_mlflow_opens_a_run(register, kedro_project):
    register(None)
    with pytest.raises(MissingDataError, match="Raw data for this run"):
        run_session(kedro_project, env="demo", pipelines=["ingest"])
    assert _runs() == []


def test_the_run_is_tagged_with_its_environment_and_the_error_that_failed_it():
    hook = MlflowRunTagsHook()
    node = Node(func=len, inputs="x", outputs="y", name="broken_node")
    with mlflow.start_run() as run:
        hook.before_node_run()
        hook.on_node_error(ValueError("bad pixel data in a.dcm " + "x" * 5000), node)
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert {"git_commit", "git_dirty", "python_version", "torch_version", "device"} <= set(tags)
    assert tags["error.node"] == "broken_node"
    assert tags["error.message"].startswith("ValueError: bad pixel data in a.dcm")
    assert len(tags["error.message"]) == 4000


def _fold_pipeline() -> Pipeline:
    return Pipeline([Node(func=len, inputs="a", outputs="b", name="n", namespace="fold_0.x"),
                     Node(func=len, inputs="b", outputs="c", name="n", namespace="fold_1"),
                     Node(func=len, inputs="c", outputs="d", name="m")])


@pytest.mark.parametrize(("end", "status"), [("after_pipeline_run", "FINISHED"),
                                              ("on_pipeline_error", "FAILED")])
def test_each_fold_has_a_child_run_ended_with_the_pipeline(end, status):
    hook = FoldRunsHook()
    with mlflow.start_run() as parent:
        hook.before_pipeline_run(_fold_pipeline())
        getattr(hook.ender, end)()
    children = {r.data.tags["fold"]: r for r in _runs()
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["fold_0", "fold_1"]
    assert {r.info.run_name for r in children.values()} == {"fold_0", "fold_1"}
    assert {r.info.status for r in children.values()} == {status}


@pytest.mark.slow
def test_ctrl_c_even_inside_an_sqlite_write_ends_the_runs_killed(tmp_path):
    """A signal that lands inside MLflow's SQLite write left the database locked for the
    KILLED mark, and the run ended FINISHED (about 1 interruption in 6 here)."""
    seed = int(os.environ.get("KILL_SEED", random.randrange(2**32)))
    print(f"interruption times from seed {seed}; KILL_SEED={seed} repeats them")
    rng = random.Random(seed)
    hook = InterruptedRunHook()
    client = mlflow.MlflowClient()
    try:
        for _ in range(24):
            parent = mlflow.start_run()
            fold = client.create_run(parent.info.experiment_id, run_name="fold_0",
                                     tags={"mlflow.parentRunId": parent.info.run_id})
            hook.before_pipeline_run()
            threading.Timer(rng.uniform(0.05, 0.5), os.kill,
                            (os.getpid(), signal.SIGINT)).start()
            try:
                for step in range(10**9):  # an epoch's curves, in a tight loop
                    mlflow.log_metric("validation_loss", 1 / (step + 1), step=step)
            except KeyboardInterrupt:
                pass
            hook.end_runs_killed()  # what runs at exit
            assert mlflow.active_run() is None
            for run_id in (parent.info.run_id, fold.info.run_id):
                run = client.get_run(run_id)
                assert run.info.status == "KILLED"
                assert run.data.tags["interrupted"] == "SIGINT"
            hook.signal_name = None
    finally:
        atexit.unregister(hook.end_runs_killed)
        hook._restore()
        while mlflow.active_run():
            mlflow.end_run()
