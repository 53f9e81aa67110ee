"""Project hooks: only what a hook alone can do.

Before any node runs: the Kedro environment exists, the raw data is there, the run's
``split.folds`` is the one the pipelines were registered for. Around the MLflow run that
kedro-mlflow opens: tags (environment, error), one nested run per cross-validation fold, and
the status KILLED when Ctrl-C or SIGTERM stops ``kedro run``.
"""

from __future__ import annotations

import atexit
import gc
import logging
import platform
import signal
import subprocess
import threading
from pathlib import Path

from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog
from kedro.pipeline import Node, Pipeline

from pneumonia_kedro.config import ConfigError
from pneumonia_kedro.datasets import DicomFolderDataset, LabelsCSVDataset
from pneumonia_kedro.errors import MissingDataError
from pneumonia_kedro.pipelines.folds import fold_of, folds_in

RAW_DATASET_TYPES = (LabelsCSVDataset, DicomFolderDataset)

logger = logging.getLogger(__name__)


class EnvironmentHook:
    """Stops a session whose Kedro environment has no folder, before plugins read it (a
    typo in ``--env`` would otherwise surface as an MLflow file-store error)."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: KedroContext) -> None:
        from kedro.framework.project import settings

        conf = Path(context.project_path) / settings.CONF_SOURCE
        # No --env means the config loader's default run environment (conf/local).
        env = context.env or getattr(context.config_loader, "default_run_env", None) or "local"
        if (conf / env).is_dir():
            return
        known = sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name != "base")
        raise MissingDataError(
            f"Kedro environment '{env}' does not exist: there is no {conf / env}"
            f". Environments here: {', '.join(known)}. Use `--env demo` for the demo data, or "
            "no --env for the Kaggle data (settings from conf/base, overrides in conf/local).")


class RawDataPresenceHook:
    """Stops a run before any node (and before its MLflow run opens) when the competition
    files it reads are absent."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict, pipeline: Pipeline, catalog: DataCatalog
                            ) -> None:
        missing = []
        for name in sorted(pipeline.inputs()):
            if name.startswith("params:") or name == "parameters" or name not in catalog:
                continue
            dataset = catalog.get(name)
            optional = getattr(dataset, "optional", False)
            if isinstance(dataset, RAW_DATASET_TYPES) and not optional and not dataset.exists():
                missing.append(f"{name}: {dataset._describe()}")
        if missing:
            env = run_params.get("env") or "local"
            raise MissingDataError(
                f"Raw data for this run (env '{env}') is missing:\n  " + "\n  ".join(missing)
                + "\nFor the real data, download the Kaggle competition "
                "'rsna-pneumonia-detection-challenge' and unzip it into "
                "data/01_raw/rsna-pneumonia-detection-challenge/ (stage_2_train_labels.csv, "
                "stage_2_train_images/, ...).\nTo try the project on generated data instead, "
                "run `make demo` (or `kedro run --env demo --pipelines demo_data` once, then "
                "`kedro run --env demo`)."
            )


class FoldCountCheckHook:
    """Refuses a run whose ``split.folds`` (after ``--env`` and ``--params``) differs from
    the fold count the pipelines were registered for: Kedro registers them before it reads
    a run's ``--env`` and ``--params`` (``pipeline_registry.py``)."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict, catalog: DataCatalog) -> None:
        from kedro.framework.project import pipelines

        folds = catalog.load("params:split").get("folds", 1)
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
            raise ConfigError(f"params:split.folds = {folds!r}: the number of cross-validation "
                              "folds, a whole number (1: one train/validation split)")
        registered = folds_in(pipelines["__default__"])
        if folds != registered:
            env = f" --env {run_params['env']}" if run_params.get("env") else ""
            raise ConfigError(
                f"params:split.folds is {folds} in this run, but the pipelines were registered "
                f"for {registered} fold{'s' * (registered > 1)}. The fold count shapes the "
                "pipelines, and Kedro registers them before it reads --params and --env: it "
                "comes from the FOLDS environment variable (conf/base/parameters_split.yml), or "
                "from conf/base and conf/$KEDRO_ENV (else conf/local). Ask for "
                f"{folds} fold{'s' * (folds > 1)} with `FOLDS={folds} kedro run{env}`.")


class MlflowRunTagsHook:
    """Tags the run's MLflow run with the git commit, the Kedro environment and the machine,
    and with the error that failed it."""

    def __init__(self) -> None:
        self._tagged_run: str | None = None

    @hook_impl
    def before_node_run(self) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None or run.info.run_id == self._tagged_run:
            return
        self._tagged_run = run.info.run_id
        mlflow.set_tags(environment_tags())

    @hook_impl
    def on_node_error(self, error: Exception, node: Node) -> None:
        """Keep the error with the run; kedro-mlflow then ends it with status FAILED."""
        import mlflow

        if mlflow.active_run() is None:
            return
        # MLflow caps tag values; the start of the message names the file and the problem.
        mlflow.set_tags({"error.node": node.name,
                         "error.message": f"{type(error).__name__}: {error}"[:4000]})


class FoldRunsHook:
    """One nested MLflow run per cross-validation fold (``fold_0`` ...) under the run
    kedro-mlflow opens for ``kedro run``: a fold's nodes log their parameters, curves,
    metrics and artefacts there; the parent keeps the out-of-fold and ensemble metrics.

    The child runs are made when the pipeline starts, in this process, so that nodes
    running side by side (``--runner ThreadRunner``) share them. A fold's node enters its
    child run after kedro-mlflow has re-entered the parent (``trylast``); the next node
    leaves it first (``ender``, ``tryfirst``), so that its parameters go to the parent.
    """

    def __init__(self) -> None:
        self.children: dict[str, str] = {}
        self.ender = _FoldRunEnder(self)

    @hook_impl(trylast=True)
    def before_pipeline_run(self, pipeline: Pipeline) -> None:
        import mlflow

        run = mlflow.active_run()
        folds = sorted({fold_of(node.namespace) for node in pipeline.nodes} - {None})
        self.children = {fold: mlflow.MlflowClient().create_run(
            run.info.experiment_id, run_name=fold,
            tags={"mlflow.parentRunId": run.info.run_id, "fold": fold}).info.run_id
            for fold in folds if run is not None}

    @hook_impl(trylast=True)
    def before_node_run(self, node: Node, inputs: dict) -> None:
        import mlflow
        from kedro_mlflow.framework.hooks import mlflow_hook
        from kedro_mlflow.framework.hooks.utils import _flatten_dict

        child = self.children.get(fold_of(node.namespace) or "")
        if child is None or mlflow.active_run() is None:
            return
        mlflow.start_run(run_id=child, nested=True)
        # The node's parameters, as kedro-mlflow logs them in the parent (mlflow.yml).
        params = {name.removeprefix("params:"): value for name, value in inputs.items()
                  if name.startswith("params:")}
        if mlflow_hook.flatten:
            params = _flatten_dict(params, recursive=mlflow_hook.recursive, sep=mlflow_hook.sep)
        for name, value in params.items():
            mlflow_hook._log_param(mlflow_hook.sanitize_param_name(name), value)

    def leave_fold_run(self) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is not None and run.info.run_id in self.children.values():
            mlflow.end_run()

    def end_fold_runs(self, status: str) -> None:
        import mlflow

        self.leave_fold_run()
        client = mlflow.MlflowClient()
        for child in self.children.values():
            if client.get_run(child).info.status == "RUNNING":
                client.set_terminated(child, status)
        self.children = {}


class _FoldRunEnder:
    """The ``tryfirst`` half of ``FoldRunsHook`` (one object holds one implementation of
    each hook)."""

    def __init__(self, owner: FoldRunsHook) -> None:
        self.owner = owner

    @hook_impl(tryfirst=True)
    def before_node_run(self) -> None:
        self.owner.leave_fold_run()

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self) -> None:
        self.owner.end_fold_runs("FINISHED")

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self) -> None:
        self.owner.end_fold_runs("FAILED")


class InterruptedRunHook:
    """Marks the MLflow runs KILLED (tag ``interrupted``) when Ctrl-C or SIGTERM stops
    ``kedro run``; the next run resumes from the last checkpoint (``train.resume``).

    Kedro hands only ``Exception`` to ``on_pipeline_error``: without this, MLflow's exit
    handler closed an interrupted run as FINISHED, with a partial curve that looked complete.
    The runs are marked at exit, once the stack has unwound. A signal that lands inside an
    SQLite write leaves that write's connection holding the database lock until the
    connection is collected, so a garbage collection comes first.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @hook_impl
    def before_pipeline_run(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals arrive there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self.interrupted)

    def interrupted(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            # Runs before MLflow's own exit handler (atexit runs the last registered first).
            atexit.register(self.end_runs_killed)
        self.signal_name = signal.Signals(signum).name
        self._restore()  # a second Ctrl-C stops at once
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def end_runs_killed(self) -> None:
        """Every active run, and its child runs still RUNNING (folds), ends KILLED."""
        import mlflow

        gc.collect()  # the interrupted write's connection: its lock goes with it
        client = mlflow.MlflowClient()
        while (run := mlflow.active_run()) is not None:
            try:  # the marks are best effort; the status below is what must land
                children = client.search_runs(
                    [run.info.experiment_id], "attributes.status = 'RUNNING' and "
                    f"tags.mlflow.parentRunId = '{run.info.run_id}'")
                for child in children:
                    client.set_tag(child.info.run_id, "interrupted", self.signal_name)
                    client.set_terminated(child.info.run_id, "KILLED")
                mlflow.set_tag("interrupted", self.signal_name)
            except Exception:  # MLflow's own exit handler would end it FINISHED
                logger.exception("could not tag the interrupted MLflow run %s", run.info.run_id)
            finally:
                mlflow.end_run(status="KILLED")

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._restore()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def environment_tags() -> dict[str, str]:
    """Git commit and state, Python, torch and the device the run can use."""
    import torch

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": str(bool(status) and status != "unknown").lower(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
