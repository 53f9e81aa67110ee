"""Project hooks."""

from __future__ import annotations

import atexit
import contextlib
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

RAW_DATASET_TYPES = (LabelsCSVDataset, DicomFolderDataset)


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
    """Stops a run before any node when the competition files it reads are absent."""

    @hook_impl
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


class MlflowRunTagsHook:
    """Tags the run's MLflow run with the git commit, the Kedro environment and the machine,
    and with the error that failed it."""

    def __init__(self) -> None:
        self._tagged_run: str | None = None

    @hook_impl
    def before_node_run(self, node: Node, catalog: DataCatalog, inputs: dict) -> None:
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


class FoldCountHook:
    """Builds the pipelines for the session's ``split.folds`` (with ``--env`` and
    ``--params``): the fold namespaces are part of a pipeline's shape."""

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        from kedro.framework.project import PACKAGE_NAME, pipelines

        from pneumonia_kedro.pipelines.folds import use_folds

        folds = (context.params.get("split") or {}).get("folds", 1)
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
            raise ConfigError(f"params:split.folds = {folds!r}: the number of cross-validation "
                              "folds, a whole number (1: one train/validation split)")
        if use_folds(folds):
            pipelines.configure(f"{PACKAGE_NAME}.pipeline_registry")


class _FoldRunEnder:
    """Ends the fold's MLflow child run before the next node starts (tryfirst), so that
    kedro-mlflow logs that node's parameters in the parent run."""

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


class FoldRunsHook:
    """One nested MLflow run per cross-validation fold (``fold_0`` ...) under the run
    kedro-mlflow opens for ``kedro run``: a fold's nodes log their parameters, curves,
    metrics and artefacts there; the parent keeps the out-of-fold and ensemble metrics.

    The child runs are made when the pipeline starts, in this process, so that nodes
    running side by side (``--runner ThreadRunner``) share them.
    """

    def __init__(self) -> None:
        self.children: dict[str, str] = {}
        self.ender = _FoldRunEnder(self)

    @hook_impl(trylast=True)
    def before_pipeline_run(self, pipeline: Pipeline) -> None:
        import mlflow

        run = mlflow.active_run()
        self.children = {}
        folds = sorted({fold for fold in map(_fold_of, pipeline.nodes) if fold})
        if run is None or not folds:
            return
        client = mlflow.MlflowClient()
        for fold in folds:
            child = client.create_run(run.info.experiment_id, run_name=fold, tags={
                "mlflow.parentRunId": run.info.run_id, "fold": fold})
            self.children[fold] = child.info.run_id
        atexit.register(self.end_fold_runs, "KILLED")  # an interrupted run's folds

    @hook_impl(trylast=True)
    def before_node_run(self, node: Node, inputs: dict) -> None:
        import mlflow

        from pneumonia_kedro.split import fold_index
        from pneumonia_kedro.training import use_fold_device

        fold = _fold_of(node)
        use_fold_device(fold_index(fold) if fold else None)
        child = self.children.get(fold or "")
        if child is None or mlflow.active_run() is None:
            return
        mlflow.start_run(run_id=child, nested=True)
        params = {}
        for name, value in inputs.items():
            if name.startswith("params:"):
                params.update(_flatten(name.removeprefix("params:"), value))
        for name, value in params.items():
            if len(str(value)) <= 6000:  # MLflow's limit on a parameter's value
                mlflow.log_param(name, value)

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
            with contextlib.suppress(Exception):  # the store may be gone at exit
                if client.get_run(child).info.status == "RUNNING":
                    client.set_terminated(child, status)
        self.children = {}


def _fold_of(node: Node) -> str | None:
    """The cross-validation fold whose namespace the node is in (``fold_2``), else None."""
    from pneumonia_kedro.split import fold_index

    top = (node.namespace or "").split(".")[0]
    return top if fold_index(top) is not None else None


def _flatten(prefix: str, value: object) -> dict[str, object]:
    """``{"train": {"epochs": 5}}`` as ``{"train.epochs": 5}``, as kedro-mlflow logs it."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, inner in value.items():
        flat.update(_flatten(f"{prefix}.{key}", inner))
    return flat


class InterruptedRunHook:
    """Marks the MLflow run KILLED when ``kedro run`` is stopped with Ctrl-C or SIGTERM.

    Kedro hands only ``Exception`` to ``on_pipeline_error``; a KeyboardInterrupt passes it, and
    MLflow's exit handler then closed the run as FINISHED, with a partial curve that looked
    complete. The signal handler only notes the signal and stops the run; the MLflow run is
    ended at exit, once the stack has unwound (the signal may arrive inside an SQLite write,
    whose lock a write from the handler would wait for). The next ``kedro run`` resumes from
    the last checkpoint (``train.resume``).
    """

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self.signal_name: str | None = None
        self._deferrals = 0

    @hook_impl
    def before_pipeline_run(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._interrupted)

    def _interrupted(self, signum: int, frame: object) -> None:
        if _inside_tracking_store(frame) and self._deferrals < MAX_DEFERRALS:
            # Interrupting an SQLite write left the store unusable for the KILLED mark (the
            # run then ended FINISHED): let the write finish, and look again in 20 ms.
            self._deferrals += 1
            signal.signal(signal.SIGALRM, lambda _, later: self._interrupted(signum, later))
            signal.setitimer(signal.ITIMER_REAL, 0.02)
            return
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        if self.signal_name is None:
            # Runs before MLflow's own exit handler (atexit runs the last registered first).
            atexit.register(self.end_runs_killed)
        self.signal_name = signal.Signals(signum).name
        self._restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def end_runs_killed(self) -> None:
        import mlflow

        while mlflow.active_run() is not None:
            with contextlib.suppress(Exception):  # the mark that matters is the status
                mlflow.set_tag("interrupted", self.signal_name)
            mlflow.end_run(status="KILLED")

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._restore()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._restore()


MAX_DEFERRALS = 250  # 5 s of 20 ms waits for a tracking-store write to finish
_TRACKING_STORE_MODULES = ("sqlalchemy", "sqlite3", "mlflow.store", "alembic")


def _inside_tracking_store(frame: object) -> bool:
    """True when the interrupted code is inside MLflow's SQL store (or SQLAlchemy)."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_TRACKING_STORE_MODULES):
            return True
        frame = frame.f_back
    return False


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
