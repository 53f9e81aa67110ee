"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from pneumonia_kedro.pipelines.folds import fold_count

# Writes synthetic data: run on purpose (`make demo` does), never as part of `kedro run`.
NOT_IN_DEFAULT = ("demo_data",)
# With split.folds > 1, cross_validation trains, classifies and evaluates once per fold.
SINGLE_MODEL = ("train", "classify", "evaluate")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines (their shape follows ``split.folds``).

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects.
    """
    pipelines = find_pipelines(raise_errors=True)
    if fold_count() == 1:
        pipelines.pop("cross_validation", None)
        left_out = NOT_IN_DEFAULT
    else:
        left_out = NOT_IN_DEFAULT + SINGLE_MODEL
    pipelines["__default__"] = sum(
        (pipeline for name, pipeline in pipelines.items()
         if name not in left_out and name != "__default__"),
        Pipeline([]),
    )
    return pipelines
