"""kedro-viz lineage: every pipeline and every catalog dataset appears, with its layer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, copy_project

# Real Kedro sessions, servers or subprocesses: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow


def test_viz_build_shows_every_pipeline_and_dataset_with_layers(tmp_path: Path):
    project = copy_project(tmp_path)
    # Two cross-validation folds, set where `kedro viz build` reads (conf/local): the fold
    # namespaces and the dataset factories' fold datasets appear.
    (project / "conf/local/parameters_split.yml").write_text("split:\n  folds: 2\n")
    kedro = Path(sys.executable).parent / "kedro"
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    subprocess.run([str(kedro), "viz", "build"], cwd=project, env=env, check=True,
                   capture_output=True, timeout=300)
    graph = json.loads((project / "build/api/main").read_text())
    pipelines = {p["id"] for p in graph["pipelines"]}
    assert pipelines == {"__default__", "demo_data", "ingest", "split", "cache", "train",
                         "classify", "evaluate", "cross_validation", "inference", "report"}
    # Each fold is a collapsible modular pipeline of the default pipeline.
    assert {"fold_0", "fold_1"} <= set(graph["modular_pipelines"])
    fold_tasks = {n["full_name"] for n in graph["nodes"] if n["type"] == "task"
                  and "fold_1" in (n["modular_pipelines"] or [])}
    assert {"fold_1.train_detector_node", "fold_1.train_classifier_node",
            "fold_1.predict_validation_node"} <= fold_tasks
    # api/main holds the default pipeline; api/pipelines/<name> each registered pipeline.
    nodes = [n for name in pipelines
             for n in json.loads((project / "build/api/pipelines" / name).read_text())["nodes"]]
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
