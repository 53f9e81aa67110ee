"""Capture the MLflow UI, kedro-viz and a temporary Orthanc's web viewer with headless Chromium.

    make screenshots          # installs Debian's chromium when it is missing, then runs this

Writes docs/images/mlflow_comparison.png (the two most recent training runs compared),
docs/images/kedro_viz.png (the default pipeline) and docs/images/kedro_viz_folds.png (the
default pipeline with three cross-validation folds, each a collapsible namespace). The MLflow
store needs two training runs with different parameters first: the README's "Comparing
experiments" makes them.

Also docs/images/orthanc_overlay.png: a temporary Orthanc (tests/orthanc.py, with Debian's
orthanc-webviewer plugin) receives demo radiographs; the inference pipeline pulls them over
DICOMweb with a tiny untrained detector (``inference.dicom_sr=true``, every box kept), the
deliver pipeline sends the SRs and overlays back, and Orthanc's web viewer shows the overlay.

    python docs/screenshots.py --only orthanc    # that picture alone (no MLflow runs needed)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
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


def capture(browser: str, url: str, target: Path, size: str, scripts: tuple[str, ...] = (),
            headers: dict[str, str] | None = None) -> None:
    """Load ``url`` in headless Chromium (sending ``headers`` with every request: a login),
    run each script (JavaScript: dismiss first-visit hints, ...) with a pause after it, and
    save a PNG of the window."""
    asyncio.run(_capture(browser, url, target, size, scripts, headers or {}))
    if not target.is_file() or target.stat().st_size < 10_000:
        sys.exit(f"Chromium wrote no usable screenshot of {url}")
    print(f"wrote {target.relative_to(ROOT)}")


async def _capture(browser: str, url: str, target: Path, size: str,
                   scripts: tuple[str, ...], headers: dict[str, str]) -> None:
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

                if headers:
                    await call("Network.enable")
                    await call("Network.setExtraHTTPHeaders", headers=headers)
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


def mlflow_and_viz(browser: str, args: argparse.Namespace) -> None:
    """The MLflow comparison of the two latest training runs, and kedro-viz with 1 and 3
    folds."""
    require_free_port("mlflow", args.mlflow_port)
    require_free_port("viz", args.viz_port)
    runs = training_runs(args.tracking_uri, args.experiment)
    if len(runs) < 2:
        sys.exit(f"{args.tracking_uri} holds {len(runs)} finished training run(s) in "
                 f"'{args.experiment}'; the comparison needs two. Run `make demo`, then "
                 "`kedro run --env demo --params train.learning_rate=0.02` (README, Comparing "
                 "experiments).")
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


# Inference on the PACS's images (as tests/pipelines/test_deliver.py runs it): every box an
# untrained detector proposes is kept, so the overlay has boxes and scores to show.
PACS_PARAMS = {"inference": {"dicom_sr": True, "progress": False, "batch_size": 4,
                             "cache": {"workers": 0, "progress": False}}}
KEEP_EVERY_BOX = {"score_threshold": 0.0, "nms_iou": 0.5, "max_boxes": 3, "shrink": 1.0}
DEMO_SEEDS = (11, 12)  # two demo radiographs with opacities


def orthanc_overlay(browser: str, target: Path) -> None:
    """Demo radiographs into a temporary Orthanc, inference and deliver through a throw-away
    project copy, then the delivered overlay in Orthanc's web viewer."""
    sys.path.insert(0, str(ROOT))  # the tests' Orthanc and demo files, reused
    from tests.orthanc import PASSWORD, PLUGIN_FOLDER, USER, Orthanc, missing_parts

    missing = missing_parts() + ([] if (PLUGIN_FOLDER / "libOrthancWebViewer.so").exists()
                                 else ["orthanc-webviewer"])
    if missing:
        sys.exit(f"Debian package(s) {', '.join(missing)} are needed: `make screenshots` "
                 "installs them.")
    folder = Path(tempfile.mkdtemp(prefix="screenshots-orthanc-"))
    server = Orthanc(folder / "orthanc")
    print(f"starting Orthanc with its web viewer (log: {server.log})")
    server.start()
    try:
        series = deliver_demo_results(server, folder / "project", {
            "PACS_DICOMWEB_URL": server.dicomweb_url, "PACS_USERNAME": USER,
            "PACS_PASSWORD": PASSWORD, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"})
        login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        capture(browser, f"{server.url}/web-viewer/app/viewer.html?series={series}", target,
                "1100,1000", headers={"Authorization": f"Basic {login}"})
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    require_yellow_boxes(target)


def deliver_demo_results(server, project: Path, environment: dict[str, str]) -> str:
    """Upload the demo radiographs, run inference (pulling them over DICOMweb) and deliver
    in a project copy; the Orthanc ID of the overlay series with the most boxes."""
    import mlflow
    import pydicom
    import torch
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.io import MemoryDataset
    from kedro.runner import SequentialRunner

    from pneumonia_kedro.ensemble import Ensemble
    from pneumonia_kedro.models import TrainedModel, build_model
    from pneumonia_kedro.pacs.overlay import findings_from_sr
    from pneumonia_kedro.pipelines import deliver, inference
    from tests.conftest import copy_project
    from tests.demo_folder import one_demo_file
    from tests.test_training import TINY_MODEL

    studies = []
    for seed in DEMO_SEEDS:
        data = one_demo_file(seed)
        server.upload(data)
        studies.append(str(pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID))
    copy_project(project.parent)
    query = json.dumps({"study_instance_uids": studies})
    (project / "conf" / "demo" / "catalog_pacs.yml").write_text(
        "test_dicoms:\n  type: pneumonia_kedro.datasets.DicomWebDataset\n"
        f"  path: data/01_raw/pacs_incoming\n  query: {query}\n")
    os.environ.update(environment)
    os.chdir(project)
    bootstrap_project(project)
    torch.manual_seed(0)  # the same untrained detector, so the same boxes, every time
    model = TrainedModel(config=TINY_MODEL, state_dict=build_model(TINY_MODEL).state_dict(),
                         info={})
    ensemble = Ensemble.of(model, None)
    with KedroSession.create(project_path=project, env="demo",
                             runtime_params=PACS_PARAMS) as session:
        catalog = session.load_context().catalog
        catalog["ensemble"] = MemoryDataset(ensemble, copy_mode="assign")
        catalog["postprocessing"] = MemoryDataset({**KEEP_EVERY_BOX,
                                                   "models": ensemble.record()})
        catalog["appearance_reference"] = MemoryDataset({"reason": "not calibrated here"})
        try:
            SequentialRunner().run(inference.create_pipeline(folds=1).from_inputs("ensemble")
                                   + deliver.create_pipeline(), catalog)
        finally:
            while mlflow.active_run():  # the artifact datasets' run, in the temporary store
                mlflow.end_run()
            os.chdir(ROOT)
    output = project / "data/07_model_output/demo"
    reports = sorted((output / "structured_reports").glob("*.dcm"))
    busiest = max(reports, key=lambda p: len(findings_from_sr(p.read_bytes(), p.name).boxes))
    overlay = pydicom.dcmread(output / "pacs_secondary_captures" / busiest.name,
                              stop_before_pixels=True)
    (found,) = server.find("Series", {"SeriesInstanceUID": overlay.SeriesInstanceUID})
    return found["ID"]


def require_yellow_boxes(picture: Path) -> None:
    """Fail when the viewer showed no overlay yet (still loading, or an error page)."""
    import cv2

    from pneumonia_kedro.pacs.overlay import BOX_COLOUR

    red, green, blue = cv2.imread(str(picture))[..., ::-1].transpose(2, 0, 1).astype(int)
    yellow = (abs(red - BOX_COLOUR[0]) < 40) & (abs(green - BOX_COLOUR[1]) < 40) & (blue < 80)
    if yellow.sum() < 200:
        sys.exit(f"{picture} shows no yellow boxes ({yellow.sum()} yellow pixels): the web "
                 "viewer had not drawn the overlay; run again.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("mlflow_and_viz", "orthanc"),
                        help="capture only these pictures (default: all)")
    parser.add_argument("--env", default="demo", help="Kedro environment for kedro-viz")
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--viz-port", type=int, default=4141)
    parser.add_argument("--tracking-uri",
                        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", default="pneumonia-kedro")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()

    browser = chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "mlflow_and_viz"):
        mlflow_and_viz(browser, args)
    if args.only in (None, "orthanc"):
        orthanc_overlay(browser, args.out / "orthanc_overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
