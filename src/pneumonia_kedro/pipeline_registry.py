"""The project's pipelines, and what ``kedro run`` runs.

``kedro run`` runs ``__default__``:

- with 1 fold (``split.folds: 1``, the default):
  ingest, split, cache, train, classify, evaluate, inference, report;
- with k > 1 folds: ingest, split, cache, cross_validation, inference, report.
  ``cross_validation`` trains, classifies and evaluates k models (namespaces ``fold_0`` ...
  ``fold_{k-1}``) in place of train, classify and evaluate (still registered: ``--pipelines
  train`` trains the single model), and inference fuses the k models.

``demo_data`` (synthetic raw data, ``make demo``) and ``deliver`` (results to a PACS) run on
purpose only, never as part of ``kedro run``.

Kedro registers the pipelines before it reads a run's ``--env`` and ``--params``, so the
fold count is read here, as Kedro loads configuration, from conf/base and the environment
``kedro run`` uses without ``--env`` (``KEDRO_ENV``, else conf/local). conf/base takes it from
the ``FOLDS`` environment variable (default 1), the one knob every command reads alike::

    FOLDS=3 kedro run --env demo
    FOLDS=3 kedro registry describe
    make viz FOLDS=3

A run whose own ``split.folds`` differs is refused before any node runs
(``hooks.RunParametersCheckHook``).
"""

from __future__ import annotations

import os
from pathlib import Path

from kedro.config import OmegaConfigLoader
from kedro.framework.project import settings
from kedro.pipeline import Pipeline
from kedro.utils import find_kedro_project
from omegaconf import OmegaConf

from pneumonia_kedro.pipelines import (
    cache,
    classify,
    cross_validation,
    deliver,
    demo_data,
    evaluate,
    inference,
    ingest,
    report,
    split,
    train,
)
from pneumonia_kedro.split import fold_count

ONE_FOLD = ("ingest", "split", "cache", "train", "classify", "evaluate", "inference", "report")
K_FOLDS = ("ingest", "split", "cache", "cross_validation", "inference", "report")
# Run on purpose, never by `kedro run`: demo_data writes synthetic raw data (`make demo`),
# deliver sends the results to a PACS (`kedro run --pipelines inference,deliver`).
ON_PURPOSE = ("demo_data", "deliver")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines, shaped by ``split.folds`` (``configured_folds``).

    Every one is built here, whatever a command asks for (not ``find_pipelines``, which
    builds only the requested ones): the run's checks compare the fold count with
    ``__default__``.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects.
    """
    folds = configured_folds()
    pipelines = {
        "demo_data": demo_data.create_pipeline(),
        "ingest": ingest.create_pipeline(),
        "split": split.create_pipeline(),
        "cache": cache.create_pipeline(),
        "train": train.create_pipeline(),
        "classify": classify.create_pipeline(),
        "evaluate": evaluate.create_pipeline(),
        "inference": inference.create_pipeline(folds=folds),
        "report": report.create_pipeline(),
        "deliver": deliver.create_pipeline(),
    }
    if folds > 1:
        pipelines["cross_validation"] = cross_validation.create_pipeline(folds=folds)
    default = ONE_FOLD if folds == 1 else K_FOLDS
    pipelines["__default__"] = sum((pipelines[name] for name in default), Pipeline([]))
    return pipelines


class _RegistryConfigLoader(OmegaConfigLoader):
    """Kedro's loader, less one side effect: each OmegaConfigLoader points OmegaConf's
    process-wide ``globals`` resolver at itself, and Kedro calls the registry inside a run,
    after the run's own loader (``--env demo``) was made, whose catalog would then read this
    loader's globals (another environment's data folders). This one leaves a resolver that
    is there in place (globals hold data paths, never ``split.folds``)."""

    def _register_globals_resolver(self) -> None:
        if not OmegaConf.has_resolver("globals"):
            super()._register_globals_resolver()


def configured_folds() -> int:
    """``split.folds`` of conf/base and the ``KEDRO_ENV`` environment (else conf/local)."""
    project = find_kedro_project(Path.cwd()) or Path.cwd()
    loader = _RegistryConfigLoader(str(project / settings.CONF_SOURCE),
                                   env=os.environ.get("KEDRO_ENV"),
                                   **settings.CONFIG_LOADER_ARGS)
    folds = loader["parameters"].get("split", {}).get("folds", 1)
    return fold_count(folds, f"split.folds (FOLDS={os.environ.get('FOLDS')!r})")
