"""What a training run reports: the live per-epoch curves (one logger for the detector and the
classifier) and, once it is done, its history table and final metrics.

The curves are written while the model trains, so that the MLflow UI shows them live; the
history and final metrics are node outputs that kedro-mlflow's datasets log.
"""

from __future__ import annotations

import time

import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pneumonia_kedro.training.fit import TrainingResult


class MlflowEpochLogger:
    """Logs each epoch's metrics with ``step=epoch`` to one MLflow run, named by its id, so
    it works from any process (the DDP rank-0 process is a spawned one)."""

    def __init__(self, tracking_uri: str, run_id: str, prefix: str = "") -> None:
        self.tracking_uri, self.run_id, self.prefix = tracking_uri, run_id, prefix

    @classmethod
    def for_active_run(cls, prefix: str = "") -> MlflowEpochLogger | None:
        """A logger to the run kedro-mlflow (or a fold's child run) has open; None outside
        a tracked run."""
        run = mlflow.active_run()
        return cls(mlflow.get_tracking_uri(), run.info.run_id, prefix) if run else None

    def __call__(self, metrics: dict, epoch: int) -> None:
        now = int(time.time() * 1000)
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=[
            Metric(f"{self.prefix}{key}", float(value), now, epoch)
            for key, value in metrics.items()])


def history_table(result: TrainingResult) -> pd.DataFrame:
    """The per-epoch history, marking the epochs taken from an interrupted run's checkpoint."""
    history = pd.DataFrame(result.history)
    history["resumed_from_checkpoint"] = history["epoch"] <= result.resumed_after_epoch
    return history


def final_metrics(result: TrainingResult, metric: str) -> dict[str, dict[str, float]]:
    """The best epoch, its validation ``metric`` and, for a run that resumed, the epochs taken
    from a checkpoint, as ``MlflowMetricsHistoryDataset`` saves them. A run trained from scratch
    carries no ``resumed_after_epoch``: a 0 would read as "resumed" in MLflow's metric filters."""
    values = {"best_epoch": result.best_epoch, f"best_{metric}": result.best_metric}
    if result.resumed_after_epoch:
        values["resumed_after_epoch"] = result.resumed_after_epoch
    return {key: {"value": float(value), "step": 0} for key, value in values.items()}
