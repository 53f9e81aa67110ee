"""Project hooks: only what a hook alone can do.

Before any node runs: the Kedro environment exists, the raw data is there, every parameter
the run takes is valid and ``split.folds`` is the one the pipelines were registered for.
Around the MLflow run that kedro-mlflow opens (``mlflow_hooks.py``): tags (environment,
error), one nested run per cross-validation fold, and the status KILLED when Ctrl-C or
SIGTERM stops ``kedro run``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.datasets import DicomFolderDataset, LabelsCSVDataset
from pneumonia_kedro.errors import MissingDataError
from pneumonia_kedro.mlflow_hooks import (
    FoldRunsHook,
    InterruptedRunHook,
    MlflowRunTagsHook,
    environment_tags,
)
from pneumonia_kedro.pipelines.folds import folds_in

RAW_DATASET_TYPES = (LabelsCSVDataset, DicomFolderDataset)
# The MLflow run's hooks live in mlflow_hooks.py; settings.py registers them from here.
__all__ = ["EnvironmentHook", "FoldRunsHook", "InterruptedRunHook", "MlflowRunTagsHook",
           "RawDataPresenceHook", "RunParametersCheckHook", "environment_tags"]

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
        missing, unusable = [], []
        for name in sorted(pipeline.inputs()):
            if name.startswith("params:") or name == "parameters" or name not in catalog:
                continue
            dataset = catalog.get(name)
            optional = getattr(dataset, "optional", False)
            if isinstance(dataset, RAW_DATASET_TYPES) and not optional and not dataset.exists():
                # A folder that exists but holds only files it cannot read (X.DCM,
                # subfolders) says so: renaming them, not downloading, is the fix.
                found = getattr(dataset, "unusable_entries", lambda: "")()
                (unusable if found else missing).append(
                    f"{name}: {found or dataset._describe()}")
        if unusable:
            raise MissingDataError("Raw data for this run is there but cannot be read:\n  "
                                   + "\n  ".join(unusable) + "\nImages must lie directly in "
                                   "the folder, named <patientId>.dcm (lower case).")
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


def _parameter_classes() -> dict[str, type]:
    """The dataclass each parameter group configures (imported here: they pull in torch)."""
    from pneumonia_kedro.classifier import ClassifierConfig
    from pneumonia_kedro.demo import DemoConfig
    from pneumonia_kedro.dicom.quality_settings import QualitySettings
    from pneumonia_kedro.engines import EngineConfig
    from pneumonia_kedro.evaluation import EvaluateConfig
    from pneumonia_kedro.imagecache import CacheConfig
    from pneumonia_kedro.models import ModelConfig
    from pneumonia_kedro.pipelines.deliver.nodes import DeliverConfig
    from pneumonia_kedro.pipelines.evaluate.nodes import ServingConfig
    from pneumonia_kedro.pipelines.inference.nodes import InferenceConfig
    from pneumonia_kedro.pipelines.ingest.nodes import IngestConfig
    from pneumonia_kedro.split import SplitConfig
    from pneumonia_kedro.training import TrainConfig

    return {"demo_data": DemoConfig, "ingest": IngestConfig, "split": SplitConfig,
            "cache": CacheConfig, "model": ModelConfig, "train": TrainConfig,
            "classifier": ClassifierConfig, "evaluate": EvaluateConfig,
            "serving": ServingConfig, "inference": InferenceConfig, "deliver": DeliverConfig,
            "quality": QualitySettings, "engine": EngineConfig}


def _read(group: str, settings: type, params: object) -> object:
    """Build one parameter group as its node does (evaluate names moved settings)."""
    if group == "evaluate":
        from pneumonia_kedro.evaluation import evaluate_config

        return evaluate_config(params)
    config = from_params(settings, params, group)
    if group == "model":
        config.check_training()
    return config


def _across_groups(built: dict[str, object]) -> list[str]:
    """Settings fine alone but not together: on Ray a training batch must split evenly
    over the workers."""
    engine = built.get("engine")
    if engine is None:
        return []
    problems = (engine.batch_split_problem(built[group].batch_size, group)
                for group in ("train", "classifier") if group in built)
    return [problem for problem in problems if problem]


class RunParametersCheckHook:
    """Refuses a run with a bad parameter before any node runs (and before MLflow opens a
    run): every ``params:<group>`` the run's nodes take is built into its dataclass (types,
    choices, ranges), and ``split.folds`` must be the registered fold count and not exceed
    the training patients the split settings can leave.

    A hook, not Kedro's typed-parameter validation: the nodes take the raw dictionaries
    (kedro-mlflow logs them flattened, one MLflow param per key), and the project's own
    ranges and messages (``config.from_params``) name the key and the allowed values.
    """

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict, pipeline: Pipeline, catalog: DataCatalog
                            ) -> None:
        # The fold count shapes the pipelines, whichever a run asks for: checked first.
        self._check_folds(run_params, catalog.load("params:split"))
        groups = sorted(name.removeprefix("params:") for name in pipeline.inputs()
                        if name.startswith("params:") and "." not in name)
        problems, built = [], {}
        classes = _parameter_classes()
        for group in groups:
            if group in classes:
                try:
                    built[group] = _read(group, classes[group], catalog.load(f"params:{group}"))
                except ConfigError as error:
                    problems.append(str(error))
        problems += _across_groups(built)
        if problems:
            raise ConfigError(f"{len(problems)} bad parameter(s) in this run, found before any "
                              "node ran:\n  " + "\n  ".join(problems))

    @staticmethod
    def _check_folds(run_params: dict, split_params: dict) -> None:
        from kedro.framework.project import pipelines

        from pneumonia_kedro.split import SplitConfig, fold_count, training_patients_at_most

        folds = fold_count(split_params.get("folds", 1))
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
        try:
            config = from_params(SplitConfig, split_params, "split")
        except ConfigError:
            return  # listed with the run's other bad parameters, where the run takes them
        most = training_patients_at_most(config)
        if folds > 1 and most is not None and folds > most:
            raise ConfigError(
                f"params:split.folds = {folds}, but the split leaves at most {most} training "
                f"patients (n_per_class {config.n_per_class} per Target, validation_fraction "
                f"{config.validation_fraction:g}): every fold needs one; use at most {most} "
                "folds (FOLDS)")
