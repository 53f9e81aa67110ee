"""What `kedro run` runs is what `kedro registry describe` and kedro-viz show, for one fold
and for k; kedro-viz lineage: every pipeline and every catalog dataset appears, with its
layer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kedro.framework.project import configure_project
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from pneumonia_kedro.pipeline_registry import ON_PURPOSE, ONE_FOLD
from tests.conftest import PROJECT_ROOT, run_session, tiny_demo_project

# Real Kedro sessions, servers or subprocesses: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

KEDRO = Path(sys.executable).parent / "kedro"


class RecordingRunner(SequentialRunner):
    """Runs no node: keeps the names of those `kedro run` would run, after every hook's
    checks before the run."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: set[str] = set()

    def run(self, pipeline: Pipeline, catalog, hook_manager=None, run_id=None,
            only_missing_outputs=False) -> dict:
        self.nodes = {node.name for node in pipeline.nodes}
        return {}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project copy with the tiny demo data (the run's raw-data check passes)."""
    with pytest.MonkeyPatch.context() as patch:
        yield tiny_demo_project(tmp_path_factory.mktemp("viz"), patch)
    configure_project("pneumonia_kedro")  # registered anew without this module's FOLDS


def _kedro(project: Path, *args: str, folds: int) -> str:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "FOLDS": str(folds), "COLUMNS": "400"}
    env.pop("KEDRO_ENV", None)
    return subprocess.run([str(KEDRO), *args], cwd=project, env=env, check=True,
                          capture_output=True, text=True, timeout=600).stdout


@pytest.fixture(scope="module")
def viz_build(project):
    """`kedro viz build` with FOLDS folds, run once per fold count for the module: the
    build folder it wrote, kept apart from the other count's."""
    built: dict[int, Path] = {}

    def build(folds: int) -> Path:
        if folds not in built:
            _kedro(project, "viz", "build", folds=folds)
            built[folds] = project / f"build-{folds}-folds"
            shutil.move(project / "build", built[folds])
        return built[folds]

    return build


@pytest.mark.parametrize("folds", [1, 2])
def test_kedro_run_runs_what_the_registry_and_kedro_viz_show(project, viz_build, monkeypatch,
                                                            folds):
    from kedro.framework.startup import bootstrap_project

    monkeypatch.chdir(project)
    monkeypatch.setenv("FOLDS", str(folds))
    bootstrap_project(project)  # the pipelines are registered anew, with FOLDS
    runner = RecordingRunner()
    run_session(project, runner=runner)  # `kedro run --env demo`
    assert any(name.startswith("fold_1.") for name in runner.nodes) == (folds == 2)
    assert ("train_detector_node" in runner.nodes) == (folds == 1)

    described = _kedro(project, "registry", "describe", folds=folds)
    assert set(re.findall(r"^- (\S+) \(", described, re.MULTILINE)) == runner.nodes

    graph = json.loads((viz_build(folds) / "api/main").read_text())
    assert {n["full_name"] for n in graph["nodes"] if n["type"] == "task"} == runner.nodes
    pipelines = {p["id"] for p in graph["pipelines"]}
    single = {"__default__", *ONE_FOLD, *ON_PURPOSE}
    assert pipelines == (single if folds == 1 else single | {"cross_validation"})


def test_viz_build_shows_every_pipeline_and_dataset_with_layers(viz_build):
    # Two cross-validation folds, as `make viz FOLDS=2` asks: the fold namespaces and the
    # dataset factories' fold datasets appear.
    build = viz_build(2)
    graph = json.loads((build / "api/main").read_text())
    pipelines = {p["id"] for p in graph["pipelines"]}
    # Each fold is a collapsible modular pipeline of the default pipeline.
    assert {"fold_0", "fold_1"} <= set(graph["modular_pipelines"])
    fold_tasks = {n["full_name"] for n in graph["nodes"] if n["type"] == "task"
                  and "fold_1" in (n["modular_pipelines"] or [])}
    assert {"fold_1.train_detector_node", "fold_1.train_classifier_node",
            "fold_1.predict_validation_node"} <= fold_tasks
    # api/main holds the default pipeline; api/pipelines/<name> each registered pipeline.
    nodes = [n for name in pipelines
             for n in json.loads((build / "api/pipelines" / name).read_text())["nodes"]]
    datasets = {n["name"]: n for n in nodes if n["type"] == "data"}
    catalog = yaml.safe_load((PROJECT_ROOT / "conf/base/catalog.yml").read_text())
    for name in catalog:
        if "{" in name:  # a dataset factory: every dataset it makes, with its layer
            pattern = re.compile(re.sub(r"\\{\w+\\}", ".+", re.escape(name)) + "$")
            made = [d for d in datasets if pattern.match(d) and d not in catalog]
            assert made, f"the factory {name} makes no dataset in the kedro-viz graph"
            assert all(datasets[d]["layer"] for d in made), f"{made} lack a layer"
            continue
        assert name in datasets, f"{name} is not in the kedro-viz graph"
        assert datasets[name]["layer"], f"{name} has no layer"
    for made in ("ingest_report", "split_report", "cache_report", "inference_report",
                 "train_image_cache", "validation_image_cache", "test_image_cache"):
        assert datasets[made]["layer"] in ("reporting", "feature"), made
    tasks = {n["name"] for n in nodes if n["type"] == "task"}
    assert {"validate_labels_node", "train_detector_node", "write_submission_node"} <= tasks
