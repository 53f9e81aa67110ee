"""Start kedro-mlflow's `kedro mlflow ui` or `kedro viz run` on 127.0.0.1, first saying what to
do when the port is taken (the one thing they lack: both fail with a traceback there).

    python -m pneumonia_kedro.ui mlflow [--port 5000]      # make mlflow-ui
    python -m pneumonia_kedro.ui viz [--port 4141]         # make viz
    python -m pneumonia_kedro.ui viz --folds 3             # make viz FOLDS=3: the fold namespaces

The MLflow UI shows the store of ``conf/<env>/mlflow.yml`` (MLFLOW_TRACKING_URI when set).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_PORTS = {"mlflow": 5000, "viz": 4141}
NAMES = {"mlflow": "MLflow UI", "viz": "kedro-viz"}


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something already listens on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the system picks it): for the DDP rendezvous and the
    tests' servers."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def occupied_port_message(tool: str, port: int) -> str:
    return (f"Port {port} on {HOST} is already in use, perhaps by another {NAMES[tool]}. "
            f"If it is this project's, open http://{HOST}:{port}; otherwise stop that process "
            f"or pick a free port: `python -m pneumonia_kedro.ui {tool} --port {port + 1}` "
            f"(`make {'mlflow-ui' if tool == 'mlflow' else 'viz'} PORT={port + 1}`).")


def tool_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to start a tool in: ``kedro mlflow ui`` starts ``mlflow`` from PATH,
    which lacks the project's ``.venv/bin`` unless the user activated it (`make mlflow-ui`
    does not), so that folder goes first."""
    environment = dict(os.environ if base is None else base)
    folder = str(Path(sys.executable).parent)
    environment["PATH"] = os.pathsep.join([folder, environment.get("PATH", "")])
    environment.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
    return environment


def command(tool: str, port: int, env: str, folds: int | None = None) -> list[str]:
    """The command line that starts ``tool`` on ``HOST:port``; for kedro-viz, with
    ``folds``, the pipelines of that many cross-validation folds: ``env FOLDS=k kedro viz
    run``, as ``kedro run`` is asked for them (the pipeline registry reads FOLDS)."""
    kedro = str(Path(sys.executable).parent / "kedro")
    if tool == "mlflow":
        return [kedro, "mlflow", "ui", "--env", env, "--host", HOST, "--port", str(port)]
    line = [kedro, "viz", "run", "--env", env, "--host", HOST, "--port", str(port),
            "--no-browser"]
    if folds is not None:
        line = [shutil.which("env") or "/usr/bin/env", f"FOLDS={folds}", *line]
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=sorted(DEFAULT_PORTS))
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--env", default="demo", help="the Kedro environment to show")
    parser.add_argument("--folds", type=int, default=None,
                        help="kedro-viz: show the pipelines for this many cross-validation folds")
    args = parser.parse_args(argv)
    port = args.port or DEFAULT_PORTS[args.tool]
    if port_in_use(port):
        print(occupied_port_message(args.tool, port), file=sys.stderr)
        return 1
    line = command(args.tool, port, args.env, args.folds)
    print(f"{NAMES[args.tool]} on http://{HOST}:{port} (Ctrl-C stops it)", flush=True)
    os.execve(line[0], line, tool_environment())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
