"""``TrainedModelDataset``: weights without pickle.

(Training checkpoints are not a dataset: the training engine keeps them in the folder its
parameters name, ``train.checkpoint_folder``; see ``training.fit``.)"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import torch
from kedro.io import AbstractVersionedDataset, DatasetError, Version
from kedro.io.core import get_filepath_str, get_protocol_and_path

from pneumonia_kedro.classifier import TrainedClassifier
from pneumonia_kedro.models import TrainedModel, model_config_from_dict


class TrainedModelDataset(AbstractVersionedDataset[TrainedModel, TrainedModel]):
    """A ``TrainedModel`` (``kind: detector``) or ``TrainedClassifier`` (``kind: classifier``)
    as one ``torch.save`` file of tensors and plain values.

    Loading uses ``torch.load(weights_only=True)``, which refuses to run code from the file,
    and rebuilds the network from the saved model config. Supports ``versioned: true``.
    """

    def __init__(self, *, filepath: str, kind: Literal["detector", "classifier"] = "detector",
                 version: Version | None = None,
                 credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        self._protocol = protocol
        self._kind = kind
        self._fs = fsspec.filesystem(protocol, **{**(credentials or {}), **(fs_args or {})})
        self.metadata = metadata
        super().__init__(filepath=PurePosixPath(path), version=version,
                         exists_function=self._fs.exists, glob_function=self._fs.glob)

    def load(self) -> TrainedModel:
        path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(path, "rb") as handle:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
        if self._kind == "classifier":
            return TrainedClassifier.from_payload(payload)
        return TrainedModel(config=model_config_from_dict(payload["model_config"]),
                            state_dict=payload["state_dict"], info=payload["info"])

    def save(self, data: TrainedModel) -> None:
        path = get_filepath_str(self._get_save_path(), self._protocol)
        self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        payload = data.to_payload() if isinstance(data, TrainedClassifier) else {
            "model_config": data.config.to_dict(), "state_dict": data.state_dict,
            "info": data.info}
        with self._fs.open(path, "wb") as handle:
            torch.save(payload, handle)

    def _exists(self) -> bool:
        try:
            path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.exists(path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "kind": self._kind, "version": self._version}
