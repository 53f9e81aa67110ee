"""Start the MLflow UI and kedro-viz on 127.0.0.1 and capture them with headless Chromium.

    make screenshots          # installs Debian's chromium when it is missing, then runs this

Writes docs/images/mlflow_comparison.png (the two most recent training runs compared),
docs/images/kedro_viz.png (the default pipeline) and docs/images/kedro_viz_folds.png (the
default pipeline with three cross-validation folds, each a collapsible namespace). The MLflow
store needs two training runs with different parameters first: the README's "Comparing
experiments" makes them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pneumonia_kedro.ui import (
    HOST,
    command,
    free_port,
    occupied_port_message,
    port_in_use,
    tool_environment,
)

ROOT = Path(__file__).resolve().parents[1]
# Chromium on a machine without a network: no background connections, no first-run UI.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--force-device-scale-factor=1"]
PAGE_SETTLE_SECONDS = 12  # the UIs fetch and lay out after the page has loaded
# First-visit hints that would cover the pictures.
CLICK_DISMISS = ("for (const b of document.querySelectorAll('button')) "
                 "if (b.textContent.trim() === 'Dismiss') b.click();")
MLFLOW_FOCUS = ("document.querySelector('button[aria-label=\"Close\"]')?.click();"  # assistant
                # only the parameters that differ, then the metrics side by side
                "const diff = document.querySelector("
                "'button[aria-label=\"Parameters - Show diff only\"]');"
                "diff?.click(); diff?.scrollIntoView({block: 'start'});")
VIZ_NO_HINTS = ("localStorage.setItem('KedroViz', JSON.stringify(Object.assign("
                "JSON.parse(localStorage.getItem('KedroViz') || '{}'), "
                "{showFeatureHints: false}))); location.reload();")


def require_free_port(tool: str, port: int) -> None:
    if port_in_use(port):
        sys.exit(f"{occupied_port_message(tool, port)} This script takes --{tool}-port.")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("Headless Chromium is needed: `sudo apt-get install chromium` (Debian), or run "
             "`make screenshots`, which installs it.")


def training_runs(tracking_uri: str, experiment: str) -> list:
    """The experiment's finished runs that trained a model, newest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    # Top-level runs only: a cross-validation run's folds are its nested child runs.
    return [run for run in runs if "best_validation_competition_metric" in run.data.metrics
            and "mlflow.parentRunId" not in run.data.tags]


def wait_for(url: str, process: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited with code {process.returncode}; its log is in the folder "
                     "printed above.")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    sys.exit(f"{what} did not answer at {url} within {timeout:.0f} s.")


def capture(browser: str, url: str, target: Path, size: str, scripts: tuple[str, ...] = ()
            ) -> None:
    """Load ``url`` in headless Chromium, run each script (JavaScript: dismiss first-visit
    hints, ...) with a pause after it, and save a PNG of the window."""
    asyncio.run(_capture(browser, url, target, size, scripts))
    if not target.is_file() or target.stat().st_size < 10_000:
        sys.exit(f"Chromium wrote no usable screenshot of {url}")
    print(f"wrote {target.relative_to(ROOT)}")


async def _capture(browser: str, url: str, target: Path, size: str,
                   scripts: tuple[str, ...]) -> None:
    import websockets

    port = free_port()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        chrome = subprocess.Popen(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            pages = []
            for _ in range(60):
                try:
                    with urllib.request.urlopen(f"http://{HOST}:{port}/json/list") as answer:
                        pages = [p for p in json.load(answer) if p["type"] == "page"]
                except OSError:
                    pass
                if pages:
                    break
                await asyncio.sleep(0.5)
            async with websockets.connect(pages[0]["webSocketDebuggerUrl"],
                                          max_size=2**28) as page:
                calls = 0

                async def call(method: str, **params: object) -> dict:
                    nonlocal calls
                    calls += 1
                    await page.send(json.dumps({"id": calls, "method": method,
                                                "params": params}))
                    while True:
                        message = json.loads(await page.recv())
                        if message.get("id") == calls:
                            return message.get("result", {})

                await call("Page.navigate", url=url)
                await asyncio.sleep(PAGE_SETTLE_SECONDS)
                for script in scripts:
                    await call("Runtime.evaluate", expression=script)
                    await asyncio.sleep(PAGE_SETTLE_SECONDS)
                shot = await call("Page.captureScreenshot", format="png")
                target.write_bytes(base64.b64decode(shot["data"]))
        finally:
            chrome.kill()
            chrome.wait()


def start(command: list[str], log: Path, tracking_uri: str) -> subprocess.Popen:
    environment = tool_environment({**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
    return subprocess.Popen(command, cwd=ROOT, env=environment, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="demo", help="Kedro environment for kedro-viz")
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--viz-port", type=int, default=4141)
    parser.add_argument("--tracking-uri",
                        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", default="pneumonia-kedro")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)

    browser = chromium()
    require_free_port("mlflow", args.mlflow_port)
    require_free_port("viz", args.viz_port)
    runs = training_runs(args.tracking_uri, args.experiment)
    if len(runs) < 2:
        sys.exit(f"{args.tracking_uri} holds {len(runs)} finished training run(s) in "
                 f"'{args.experiment}'; the comparison needs two. Run `make demo`, then "
                 "`kedro run --env demo --params train.learning_rate=0.02` (README, Comparing "
                 "experiments).")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="screenshots-"))
    servers = []
    try:
        mlflow_ui = start(command("mlflow", args.mlflow_port, args.env), logs / "mlflow.log",
                          args.tracking_uri)
        servers.append(mlflow_ui)
        viz = start(command("viz", args.viz_port, args.env), logs / "viz.log",
                    args.tracking_uri)
        servers.append(viz)
        print(f"starting the MLflow UI and kedro-viz (logs in {logs})")
        mlflow_url = f"http://{HOST}:{args.mlflow_port}"
        wait_for(mlflow_url, mlflow_ui, "mlflow ui")
        ids = json.dumps([run.info.run_id for run in runs[:2]])
        experiment_ids = json.dumps([runs[0].info.experiment_id])
        compare = f"{mlflow_url}/#/compare-runs?runs={ids}&experiments={experiment_ids}"
        capture(browser, compare, args.out / "mlflow_comparison.png", "1500,1250",
                (MLFLOW_FOCUS,))
        viz_url = f"http://{HOST}:{args.viz_port}"
        wait_for(f"{viz_url}/api/main", viz, "kedro viz run")
        capture(browser, viz_url, args.out / "kedro_viz.png", "1800,1400",
                (VIZ_NO_HINTS, CLICK_DISMISS))
        stop(viz)
        servers.remove(viz)
        folds = start(command("viz", args.viz_port, args.env, folds=3), logs / "viz_folds.log",
                      args.tracking_uri)
        servers.append(folds)
        wait_for(f"{viz_url}/api/main", folds, "FOLDS=3 kedro viz run")
        capture(browser, viz_url, args.out / "kedro_viz_folds.png", "1800,1400",
                (VIZ_NO_HINTS, CLICK_DISMISS))
    finally:
        for server in servers:
            stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
