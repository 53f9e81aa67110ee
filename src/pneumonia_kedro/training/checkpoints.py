"""Checkpoints (the last epoch's state, the best weights) and the fingerprint that decides
whether a checkpoint may be resumed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.models import ModelConfig
from pneumonia_kedro.split import fold_name
from pneumonia_kedro.training.engine import Optimisation

logger = logging.getLogger(__name__)


class CheckpointStore:
    """The last epoch's training state and the best weights in a folder; tensors only.

    A store bound to a training ``fingerprint`` (settings and data) only resumes from a last
    checkpoint written under the same fingerprint.
    """

    def __init__(self, path: str | Path, fingerprint: str = "") -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def bound_to(self, fingerprint: str) -> CheckpointStore:
        return CheckpointStore(self.path, fingerprint)

    @property
    def last_file(self) -> Path:
        return self.path / "last.pt"

    @property
    def best_file(self) -> Path:
        return self.path / "best.pt"

    def _save(self, obj: dict, target: Path) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.path, suffix=".partial", delete=False) as tmp:
            torch.save(obj, tmp.name)
        os.replace(tmp.name, target)

    def save_last(self, state: dict) -> None:
        self._save({**state, "fingerprint": self.fingerprint}, self.last_file)

    def save_best(self, state_dict: dict, epoch: int) -> None:
        """The best weights, with their epoch (1-based): written after ``last.pt`` names
        that epoch best, so a kill between the two files leaves a pair ``best_state`` can
        check."""
        self._save({"state_dict": state_dict, "epoch": epoch, "fingerprint": self.fingerprint},
                   self.best_file)

    def load_last(self) -> dict | None:
        if not self.last_file.is_file():
            return None
        last = torch.load(self.last_file, map_location="cpu", weights_only=True)
        if last.get("fingerprint", "") != self.fingerprint:
            logger.info("the checkpoint in %s is from other settings or data; training from the "
                        "first epoch", self.path)
            return None
        return last

    def load_best(self, epoch: int) -> dict | None:
        """The best weights saved for ``epoch`` (1-based); None when ``best.pt`` is of
        another epoch or other settings."""
        if not self.best_file.is_file():
            return None
        best = torch.load(self.best_file, map_location="cpu", weights_only=True)
        if best.get("fingerprint", "") != self.fingerprint or best.get("epoch") != epoch:
            return None
        return best["state_dict"]

    def best_state(self, last: dict) -> dict | None:
        """The best epoch's weights of the run ``last`` (a ``load_last``) checkpointed: its
        own model when its epoch was the best (it is written first), else ``best.pt`` of
        that epoch; None when neither holds them."""
        if int(last["best_epoch"]) == int(last["epoch"]) + 1:
            return last["model"]
        return self.load_best(int(last["best_epoch"]))


def checkpoint_store(folder: str | None, fingerprint: str, fold: int | None = None
                     ) -> CheckpointStore | None:
    """The store of a training run in ``folder`` (None: no checkpoints); a cross-validation
    fold keeps its own in a ``fold_<i>`` subfolder."""
    if not folder:
        return None
    return CheckpointStore(Path(folder) / (fold_name(fold) if fold is not None else ""),
                           fingerprint)


# Settings that change neither the trained weights nor the curves.
_NOT_FINGERPRINTED = {"resume", "progress", "num_workers", "validation_batch_size",
                      "checkpoint_folder"}


def training_fingerprint(model_config: ModelConfig | None, config: object,
                         caches: list[ImageCache], patient_tables: list[pd.DataFrame]) -> str:
    """A digest of everything a training run's result depends on: the model (the
    classifier's is part of its ``config``), the settings (a dataclass), data and labels."""
    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_FINGERPRINTED}
    digest = hashlib.sha256(json.dumps(
        [model_config.to_dict() if model_config else None, settings,
         [cache.manifest["fingerprint"] for cache in caches]],
        sort_keys=True, default=str).encode())
    for table in patient_tables:
        digest.update(pd.util.hash_pandas_object(table.astype(str), index=False).values.tobytes())
    return digest.hexdigest()


def resume_state(model: torch.nn.Module, optimisation: Optimisation,
                 scaler: torch.amp.GradScaler, **progress: object) -> dict:
    """What ``restore`` needs to continue after this epoch exactly as if never stopped.

    No RNG state: every epoch reseeds from ``seed + epoch``. The GradScaler's scale and growth
    tracker are kept, so an interrupted AMP run resumes with the same loss scaling.
    """
    return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            **optimisation.state_dict(), "scaler": scaler.state_dict(), **progress}


def restore(last: dict, model: torch.nn.Module, optimisation: Optimisation,
            scaler: torch.amp.GradScaler) -> None:
    """Load a ``resume_state`` into freshly built training objects."""
    model.load_state_dict(last["model"])
    optimisation.load_state_dict(last)
    # A disabled scaler (CPU, or AMP off) saves {}; one that was enabled saves its scale.
    if last.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(last["scaler"])
