"""Shared fixtures: a throw-away copy of the Kedro project and a temporary MLflow store."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["KEDRO_DISABLE_TELEMETRY"] = "1"

# hypothesis is imported before any test starts Ray: its pytest plugin otherwise imports it
# at the terminal summary, after Ray ran, and Python 3.11.7 then fails with "SystemError: AST
# constructor recursion depth mismatch" (rc 1 after every test passed).
import hypothesis  # noqa: E402
import pytest  # noqa: E402

# No per-example deadline: under make test's two workers the other one may hold both cores.
hypothesis.settings.register_profile("suite", deadline=None)
hypothesis.settings.load_profile("suite")

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# A demo dataset small enough for unit tests and still stratifiable.
TINY_DEMO = {"n_positive": 8, "n_negative": 8, "n_test": 3, "seed": 7}
DEMO_RAW = "data/01_raw/rsna-demo"


@pytest.fixture(autouse=True)
def _temporary_mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test tracks to its own SQLite store, never the project's mlflow.db."""
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    # MLflow remembers the last experiment set in this process (a Kedro session sets one):
    # a run started in the next test's new store would look for it there.
    import mlflow.tracking.fluent

    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None, raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set_experiment exports it
    return store


def write_demo_dicoms(folder: Path, n_positive: int, n_negative: int, seed: int):
    """Competition-like demo DICOMs (``<patientId>.dcm``) in ``folder``; returns the patients
    (with their ``xywh`` boxes)."""
    from pneumonia_kedro.demo import DemoConfig
    from tests.demo_folder import write_demo_folder

    config = DemoConfig(n_positive=n_positive, n_negative=n_negative, n_test=0, seed=seed)
    return write_demo_folder(folder, config)


def copy_project(folder: Path) -> Path:
    """A copy of the project's pyproject and conf (local emptied) in ``folder/project``."""
    project = folder / "project"
    project.mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf",
                    ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()  # the package itself is installed (editable) in .venv
    return project


def tiny_demo_project(root: Path, monkeypatch: pytest.MonkeyPatch,
                      raw: Path | None = None) -> Path:
    """A bootstrapped project copy in ``root`` holding the tiny demo dataset (generated, or
    copied from ``raw``); ``monkeypatch`` makes it the cwd and its own SQLite store the
    tracking URI, for this process and the ``kedro run`` processes it starts."""
    from kedro.framework.startup import bootstrap_project

    project = copy_project(root)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    bootstrap_project(project)
    if raw is None:
        run_session(project, pipelines=["demo_data"], params={"demo_data": TINY_DEMO})
    else:
        shutil.copytree(raw, project / DEMO_RAW)
    return project


def use_run(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make a module's finished run (``{"project", "tracking_uri"}``) the cwd and the MLflow
    store of this test; returns its project."""
    import mlflow

    monkeypatch.chdir(run["project"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run["tracking_uri"])
    mlflow.set_tracking_uri(run["tracking_uri"])
    return run["project"]


def run_session(project: Path, env: str = "demo", pipelines: list[str] | None = None,
                params: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run pipelines in a real KedroSession of ``project`` (already bootstrapped)."""
    import mlflow
    from kedro.framework.session import KedroSession

    try:
        with KedroSession.create(project_path=project, env=env,
                                 runtime_params=params or {}) as session:
            return session.run(pipeline_names=pipelines, **kwargs)
    finally:
        # kedro-mlflow reopens its run per node and closes one level at the end; a CLI run
        # ends with its process, so close what is left before the next session in this one.
        while mlflow.active_run():
            mlflow.end_run()


@pytest.fixture
def kedro_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's conf and pyproject in tmp_path, which becomes the cwd."""
    project = copy_project(tmp_path)
    monkeypatch.chdir(project)
    return project


@pytest.fixture
def run_kedro(kedro_project: Path) -> Callable[..., dict[str, Any]]:
    """Run pipelines in a real KedroSession of the copied project."""
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(kedro_project)

    def run(env: str = "demo", pipelines: list[str] | None = None,
            params: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        return run_session(kedro_project, env, pipelines, params, **kwargs)

    return run


def build_killed_at_chunk(cache_plan: Any, folder: Path, chunk: int,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the cache ``cache_plan`` into ``folder``, killed (KeyboardInterrupt, as a Ctrl-C
    or kill does) when the ``chunk``-th chunk starts decoding."""
    from pneumonia_kedro.imagecache import build, decoding

    real_decode_rows, calls = decoding._decode_rows, {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == chunk:
            raise KeyboardInterrupt
        return real_decode_rows(*args, **kwargs)

    monkeypatch.setattr(decoding, "_decode_rows", dies)
    try:
        with pytest.raises(KeyboardInterrupt):
            build(cache_plan, folder)
    finally:
        monkeypatch.setattr(decoding, "_decode_rows", real_decode_rows)
