"""The hooks and the pipeline registry, through real Kedro sessions and a real MLflow SQLite
store: a run that asks for another fold count than the registered pipelines is refused
before MLflow opens a run; the registry reads the fold count as Kedro reads configuration
without changing the run's own; the MLflow tags; the fold child runs' statuses; Ctrl-C,
even inside an SQLite write, ends the runs KILLED."""

from __future__ import annotations

import atexit
import gc
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

# Real Kedro sessions and MLflow stores: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

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
    with pytest.raises(ConfigError, match=r"split.folds \(FOLDS='two'\) = 'two': the number"):
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
        hook.before_node_run(node)
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


def _children(parent) -> dict:
    return {r.data.tags["fold"]: r for r in _runs()
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def _enter(hook: FoldRunsHook, node: Node, done: bool = True) -> None:
    """What the runner's hooks do around one node."""
    hook.ender.before_node_run()
    hook.before_node_run(node, {})
    if done:
        hook.after_node_run(node)


@pytest.mark.parametrize(("end", "status"), [("after_pipeline_run", "FINISHED"),
                                              ("on_pipeline_error", "FAILED")])
def test_each_fold_that_ran_has_a_child_run_ended_with_the_pipeline(end, status):
    hook, pipeline = FoldRunsHook(), _fold_pipeline()
    with mlflow.start_run() as parent:
        hook.before_pipeline_run(pipeline)
        fold_0, fold_1, last = pipeline.nodes
        _enter(hook, fold_0)
        _enter(hook, fold_1, done=end == "after_pipeline_run")  # on error: it failed
        if end == "after_pipeline_run":
            _enter(hook, last)
        getattr(hook.ender, end)()
    children = _children(parent)
    assert sorted(children) == ["fold_0", "fold_1"]
    assert {r.info.run_name for r in children.values()} == {"fold_0", "fold_1"}
    # On error the last fold's node failed (FAILED); the first fold had finished.
    assert children["fold_1"].info.status == status
    assert children["fold_0"].info.status == "FINISHED"


def test_a_fold_that_never_started_has_no_child_run_and_an_unfinished_one_ends_killed():
    """A cross-validation run killed during fold_0 left fold_1's child run, which never
    trained, FINISHED with no metrics."""
    hook, interrupted = FoldRunsHook(), InterruptedRunHook()
    two_nodes = Pipeline([Node(func=len, inputs="a", outputs="b", name="t", namespace="fold_0"),
                          Node(func=len, inputs="b", outputs="c", name="c", namespace="fold_0"),
                          Node(func=len, inputs="c", outputs="d", name="n", namespace="fold_1"),
                          Node(func=len, inputs="d", outputs="e", name="m")])
    parent = mlflow.start_run()
    hook.before_pipeline_run(two_nodes)
    first = next(n for n in two_nodes.nodes if n.name == "fold_0.t")
    _enter(hook, first)
    hook.ender.before_node_run()  # a node of the parent between fold_0's two nodes
    assert mlflow.active_run().info.run_id == parent.info.run_id
    (child,) = _children(parent).values()
    assert child.info.status == "RUNNING"  # fold_0 is not done: not FINISHED
    interrupted.signal_name = "SIGINT"
    interrupted.end_runs_killed()  # what Ctrl-C leads to at exit
    children = _children(parent)
    assert list(children) == ["fold_0"]  # fold_1 never started: no run claims it
    assert children["fold_0"].info.status == "KILLED"
    assert mlflow.get_run(parent.info.run_id).info.status == "KILLED"


def test_an_error_in_a_generator_node_s_later_chunk_is_tagged_on_the_run():
    """Kedro calls on_node_error only around node.run: the cache and SR nodes' later chunks
    failed without error.node / error.message on the run."""
    from kedro.framework.hooks.manager import _create_hook_manager
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner

    def chunks(x: int):
        yield x
        raise OSError("disk full writing chunk 2 of train_image_cache")

    manager = _create_hook_manager()
    hook = MlflowRunTagsHook()
    manager.register(hook)
    pipeline = Pipeline([Node(func=chunks, inputs="x", outputs="y", name="cache_node")])
    catalog = DataCatalog({"x": MemoryDataset(1), "y": MemoryDataset()})
    with mlflow.start_run() as run:
        hook.before_pipeline_run()
        with pytest.raises(OSError, match="disk full") as info:
            SequentialRunner().run(pipeline, catalog, manager)
        manager.hook.on_pipeline_error(error=info.value, run_params={}, pipeline=pipeline,
                                       catalog=catalog)  # what the session calls
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["error.node"] == "cache_node"
    assert tags["error.message"] == "OSError: disk full writing chunk 2 of train_image_cache"


def test_bad_parameters_are_refused_together_before_any_node_and_before_mlflow(
        register, kedro_project):
    """Bad train.* settings were caught only after ingest, split, cache and the classifier
    had run (and the classifier had saved a new version)."""
    register(None)
    bad = {"train": {"epochs": 0}, "classifier": {"batch_size": -2},
           "inference": {"no_box": "nothing"}, "split": {"validation_fraction": 1.5}}
    with pytest.raises(ConfigError, match="4 bad parameter") as info:
        run_session(kedro_project, env="demo", params=bad)
    message = str(info.value)
    # The split group is read first, for the fold checks; its error is listed with the rest.
    assert "params:split.validation_fraction = 1.5 is out of range" in message
    assert "params:train.epochs = 0 is out of range: it must be >= 1" in message
    assert "params:classifier.batch_size = -2 is out of range" in message
    assert "params:inference.no_box = 'nothing'" in message
    assert _runs() == []  # before kedro-mlflow opened a run
    assert not (kedro_project / "data").exists()  # no node ran


def test_a_batch_that_does_not_split_over_the_ray_workers_is_refused_before_any_node(
        register, kedro_project):
    """It was refused only when the train node started Ray Train, after ingest, split and
    cache had run."""
    register(None)
    params = {"engine": {"backend": "ray", "train": {"num_workers": 3}},
              "train": {"batch_size": 8}, "classifier": {"batch_size": 10},
              "evaluate": {"batch_size": 0}}
    with pytest.raises(ConfigError, match="3 bad parameter") as info:
        run_session(kedro_project, env="demo", params=params)
    for group, batch in (("train", 8), ("classifier", 10)):
        assert (f"params:{group}.batch_size = {batch} does not split over "
                "params:engine.train.num_workers = 3 Ray workers: give a multiple of 3"
                ) in str(info.value)
    assert "params:evaluate.batch_size = 0" in str(info.value)  # reported in the same run
    assert _runs() == []
    assert not (kedro_project / "data").exists()
    # 12 and 9 split over 3, and the local engine has no such rule: only evaluate's left.
    for engine, train, classifier in (("ray", 12, 9), ("local", 8, 10)):
        params = {"engine": {"backend": engine, "train": {"num_workers": 3}},
                  "train": {"batch_size": train}, "classifier": {"batch_size": classifier},
                  "evaluate": {"batch_size": 0}}
        with pytest.raises(ConfigError, match="1 bad parameter") as info:
            run_session(kedro_project, env="demo", params=params)
        assert "params:evaluate.batch_size = 0" in str(info.value)


def test_a_run_checks_only_the_parameters_its_pipelines_take(register, kedro_project):
    register(None)
    # The ingest pipeline takes no train.* settings: its own raw-data check answers.
    with pytest.raises(MissingDataError, match="Raw data for this run"):
        run_session(kedro_project, env="demo", pipelines=["ingest"],
                    params={"train": {"epochs": 0}})


def test_more_folds_than_the_split_can_leave_training_patients_is_refused_up_front(
        register, kedro_project):
    """split.folds=1000 took 6.5 minutes (ingest, split, cache) to fail."""
    register(40)
    with pytest.raises(ConfigError, match=r"params:split.folds = 40, but the split leaves at "
                                          r"most 16 training patients \(n_per_class 10 per "
                                          r"Target, validation_fraction 0.2\)"):
        run_session(kedro_project, env="demo", params={"split": {"folds": 40,
                                                                 "n_per_class": 10}})
    assert _runs() == []


@pytest.mark.slow
def test_ctrl_c_even_inside_an_sqlite_write_ends_the_runs_killed(tmp_path):
    """A signal that lands inside MLflow's SQLite write left the database locked for the
    KILLED mark, and the run ended FINISHED (about 1 interruption in 6 here)."""
    seed = int(os.environ.get("KILL_SEED", random.randrange(2**32)))
    print(f"interruption times from seed {seed}; KILL_SEED={seed} repeats them")
    rng = random.Random(seed)
    hook = InterruptedRunHook()
    client = mlflow.MlflowClient()
    # The suite's earlier objects kept out of the hook's gc.collect (seconds each, 24 times);
    # what the interrupted write leaves is made after this and is still collected.
    gc.freeze()
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
        gc.unfreeze()
        atexit.unregister(hook.end_runs_killed)
        hook._restore()
        while mlflow.active_run():
            mlflow.end_run()
