"""How many cross-validation folds the pipelines are built for (``split.folds``).

A pipeline's shape is fixed when it is registered, before any node runs, so the fold count
is read from the configuration there: ``FoldCountHook`` passes it from the session's
parameters (with ``--env`` and ``--params``); without a session (kedro-viz without
``--include-hooks``) it is read from ``conf/base`` and the ``KEDRO_ENV`` (or local)
environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from pneumonia_kedro.split import fold_name

# Set by the session (FoldCountHook); None: read the configuration.
_session: dict[str, int | None] = {"folds": None}


def fold_names(folds: int) -> list[str]:
    """The Kedro namespaces of the folds: ``fold_0`` ... ``fold_{k-1}``."""
    return [fold_name(i) for i in range(folds)]


def member_datasets(folds: int) -> list[str]:
    """The (detector, classifier) dataset pairs of the models that predict together."""
    if folds == 1:
        return ["trained_model", "trained_classifier"]
    return [f"{fold}.{name}" for fold in fold_names(folds)
            for name in ("trained_model", "trained_classifier")]


def _configured() -> int:
    """``split.folds`` of the parameter files of conf/base and the ``KEDRO_ENV`` (or local)
    environment, the latter winning. Read as plain YAML: a second OmegaConfigLoader would
    replace the session's ``globals`` resolver."""
    import yaml
    from kedro.framework.project import settings

    conf = Path.cwd() / settings.CONF_SOURCE
    folds = 1
    for env in ("base", os.environ.get("KEDRO_ENV") or "local"):
        for path in sorted((conf / env).glob("parameters*.yml")):
            split = (yaml.safe_load(path.read_text()) or {}).get("split") or {}
            folds = split.get("folds", folds)
    return int(folds)


def fold_count() -> int:
    """The session's ``split.folds``, else the configured one."""
    return _session["folds"] if _session["folds"] is not None else _configured()


def use_folds(folds: int) -> bool:
    """Build the pipelines for ``folds`` folds; True when that changes the registered ones."""
    changed = _session["folds"] != folds
    _session["folds"] = folds
    return changed
