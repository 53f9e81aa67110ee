"""Project settings. See https://docs.kedro.org/en/stable/configure/configuration_basics/"""

import os

from omegaconf.resolvers import oc

from pneumonia_kedro.hooks import (
    EnvironmentHook,
    FoldRunsHook,
    InterruptedRunHook,
    MlflowRunTagsHook,
    RawDataPresenceHook,
    RunParametersCheckHook,
)

# Telemetry is opt-out in Kedro; this project never sends it (the Makefile, CI and tests set
# it too, since kedro-telemetry can run before this file is imported).
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

_FOLD_RUNS = FoldRunsHook()
HOOKS = (EnvironmentHook(), RawDataPresenceHook(), RunParametersCheckHook(), MlflowRunTagsHook(),
         _FOLD_RUNS, _FOLD_RUNS.ender, InterruptedRunHook())

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # mlflow.yml reads MLFLOW_TRACKING_URI and parameters_split.yml FOLDS; Kedro enables
    # oc.env for credentials only.
    "custom_resolvers": {"oc.env": oc.env},
    # An environment's parameter files hold only what differs from conf/base: its keys are
    # merged into base's groups instead of replacing them.
    "merge_strategy": {"parameters": "soft"},
}
