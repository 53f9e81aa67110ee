"""The UI launcher: an occupied port gets what to do next; a free one serves the MLflow UI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pneumonia_kedro.ui import command, free_port

# Real Kedro sessions, servers or subprocesses: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow


def test_viz_shows_k_folds_the_way_kedro_run_is_asked_for_them():
    line = command("viz", 4141, "demo", folds=3)
    assert line[1] == "FOLDS=3" and Path(line[2]).name == "kedro" and line[3:5] == ["viz", "run"]
    assert "--params" not in line and "--include-hooks" not in line
    assert result_of(line[:2] + [sys.executable, "-c", "import os; print(os.environ['FOLDS'])"]
                     ) == "3"
    assert "FOLDS=3" not in command("viz", 4141, "demo")


def result_of(line: list[str]) -> str:
    return subprocess.run(line, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize(("tool", "make_target"), [("mlflow", "mlflow-ui"), ("viz", "viz")])
def test_an_occupied_port_says_what_to_do_next(tool, make_target):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "pneumonia_kedro.ui", tool,
                                 "--port", str(port)], capture_output=True, text=True,
                                timeout=120, check=False)
    assert result.returncode == 1
    assert f"Port {port} on 127.0.0.1 is already in use" in result.stderr
    assert f"open http://127.0.0.1:{port}" in result.stderr
    assert f"--port {port + 1}" in result.stderr
    assert f"make {make_target} PORT={port + 1}" in result.stderr


def test_the_mlflow_ui_starts_on_a_free_port(tmp_path):
    from tests.conftest import copy_project

    project = copy_project(tmp_path)  # kedro-mlflow's `kedro mlflow ui` reads its mlflow.yml
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumonia_kedro.ui", "mlflow", "--port", str(port)],
        cwd=project, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        # PATH without the environment's bin folder, as `make mlflow-ui` runs it (the
        # mlflow command was not found there).
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                     if p != os.path.dirname(sys.executable))})
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline and status != 200:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    status = page.status
                    body = page.read().decode()
            except OSError:
                time.sleep(1)
        assert status == 200 and "MLflow" in body
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
