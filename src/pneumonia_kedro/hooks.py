"""Project hooks."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog
from kedro.pipeline import Node, Pipeline

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
