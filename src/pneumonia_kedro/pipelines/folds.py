"""The names the cross-validation folds give the pipelines: their namespaces and the models
that predict together. How many folds there are is decided in ``pipeline_registry.py``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from pneumonia_kedro.split import fold_index, fold_name


def fold_names(folds: int) -> list[str]:
    """The Kedro namespaces of the folds: ``fold_0`` ... ``fold_{k-1}``."""
    return [fold_name(i) for i in range(folds)]


def member_datasets(folds: int) -> list[str]:
    """The (detector, classifier) dataset pairs of the models that predict together."""
    if folds == 1:
        return ["trained_model", "trained_classifier"]
    return [f"{fold}.{name}" for fold in fold_names(folds)
            for name in ("trained_model", "trained_classifier")]


def fold_of(namespace: str | None) -> str | None:
    """The fold (``fold_2``) a node's namespace (``fold_2.train``) is in, else None."""
    top = (namespace or "").split(".")[0]
    return top if fold_index(top) is not None else None


def folds_in(pipeline: Pipeline) -> int:
    """How many folds ``pipeline`` was built for (1: none)."""
    return len({fold_of(node.namespace) for node in pipeline.nodes} - {None}) or 1
