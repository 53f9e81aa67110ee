"""The models that predict together: one detector (and classifier) per cross-validation fold.

With ``split.folds: 1`` the ensemble has one member, the single trained model, so evaluation,
inference and the served model take the same path for one model as for k. ``Ensemble.build``
makes its ``Networks``, which ``prediction.predict`` runs: detectors' boxes are fused (weighted
boxes fusion over every model and test-time variant in one step), classifiers' probabilities
are averaged (``Networks.classify``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pneumonia_kedro.classifier import TrainedClassifier, classify
from pneumonia_kedro.config import ConfigError
from pneumonia_kedro.models import TrainedModel
from pneumonia_kedro.split import fold_name


@dataclass
class Ensemble:
    """Named members, each a detector with its image-level classifier (or ``None``)."""

    names: list[str]
    detectors: list[TrainedModel]
    classifiers: list[TrainedClassifier | None]

    def __post_init__(self) -> None:
        if not self.detectors or len(self.names) != len(self.detectors) or \
                len(self.classifiers) != len(self.detectors):
            raise ValueError("an ensemble needs one name and one classifier slot per detector")
        sizes = {d.config.image_size for d in self.detectors}
        if len(sizes) > 1:
            raise ValueError(f"ensemble members were trained at different image sizes {sizes}")

    @classmethod
    def of(cls, *members: TrainedModel | TrainedClassifier | None) -> Ensemble:
        """From (detector, classifier) pairs in order, as a Kedro node passes them: one pair
        is ``model``, several are the folds ``fold_0`` ..."""
        if len(members) % 2:
            raise ValueError("members come in (detector, classifier) pairs")
        detectors, classifiers = list(members[0::2]), list(members[1::2])
        names = ["model"] if len(detectors) == 1 else \
            [fold_name(i) for i in range(len(detectors))]
        return cls(names, detectors, classifiers)

    @property
    def image_size(self) -> int:
        return self.detectors[0].config.image_size

    @property
    def has_classifiers(self) -> bool:
        return all(c is not None for c in self.classifiers)

    @property
    def version(self) -> str:
        """The one member's version, or the architecture, member count and a digest of every
        member's (what a DICOM SR names as the algorithm version)."""
        return self._version([d.version for d in self.detectors])

    def _version(self, detector_versions: list[str]) -> str:
        if len(detector_versions) == 1:
            return detector_versions[0]
        digest = hashlib.sha256(",".join(detector_versions).encode())
        return (f"{self.detectors[0].config.architecture}-x{len(detector_versions)}-"
                f"{digest.hexdigest()[:12]}")

    def record(self) -> dict:
        """The models by their weights: the version and each member's detector and classifier
        version (``postprocessing.json`` and the reports carry it; each weights digest is
        computed once)."""
        members = {name: {"detector": d.version,
                          "classifier": None if c is None else c.version}
                   for name, d, c in zip(self.names, self.detectors, self.classifiers,
                                         strict=True)}
        return {"version": self._version([m["detector"] for m in members.values()]),
                "members": members}

    def select(self, choice: str) -> Ensemble:
        """``ensemble``: every member; a member's name (e.g. ``fold_2``): that one alone."""
        if choice == "ensemble":
            return self
        if choice not in self.names:
            raise ConfigError(f"params:inference.models = {choice!r}: use 'ensemble' or one of "
                              f"{', '.join(self.names)}")
        i = self.names.index(choice)
        return Ensemble([choice], [self.detectors[i]], [self.classifiers[i]])

    def build(self, device: torch.device | str = "cpu", detectors: bool = True,
              classifiers: bool = True) -> Networks:
        """The members' networks on ``device``, ready to predict; the classifiers only when
        every member has one (a gate needs every member's vote)."""
        device = torch.device(device)
        with_classifiers = classifiers and self.has_classifiers
        return Networks(
            detectors=[d.build(device) for d in self.detectors] if detectors else [],
            classifiers=[c.build(device) for c in self.classifiers] if with_classifiers else [],
            classifier_sizes=[c.image_size for c in self.classifiers] if with_classifiers
            else [],
            device=device)


@dataclass
class Networks:
    """An ensemble's detectors and image-level classifiers, built on ``device``."""

    detectors: list[torch.nn.Module]
    classifiers: list[torch.nn.Module]
    classifier_sizes: list[int]  # the input size each classifier was trained at
    device: torch.device

    def classify(self, images: torch.Tensor, hflip: bool) -> np.ndarray:
        """The mean of the classifiers' opacity probabilities per uint8 image (B, 1, S, S);
        with ``hflip`` each classifier also sees the mirror, as the detectors do."""
        return np.mean([classify(model, images, size, self.device, hflip)
                        for model, size in zip(self.classifiers, self.classifier_sizes,
                                               strict=True)], axis=0)


def save_ensemble(ensemble: Ensemble, weights_file: Path, classifier_file: Path) -> bool:
    """Tensors-only files of every member (``torch.load(weights_only=True)`` reads them);
    the classifiers' only when every member has one. True when it wrote them."""
    torch.save({"members": [{"name": name, "model_config": d.config.to_dict(),
                             "state_dict": d.state_dict}
                            for name, d in zip(ensemble.names, ensemble.detectors,
                                               strict=True)]}, weights_file)
    if not ensemble.has_classifiers:
        return False
    torch.save({"members": [c.to_payload() for c in ensemble.classifiers]}, classifier_file)
    return True


def load_ensemble(weights_file: Path, classifier_file: Path | None = None,
                  info: dict | None = None) -> Ensemble:
    """The ensemble ``save_ensemble`` wrote (or a single model's older file)."""
    from pneumonia_kedro.models import model_config_from_dict

    payload = torch.load(weights_file, map_location="cpu", weights_only=True)
    members = payload.get("members", [{"name": "model", **payload}])
    detectors = [TrainedModel(config=model_config_from_dict(m["model_config"]),
                              state_dict=m["state_dict"], info=dict(info or {}))
                 for m in members]
    classifiers: list[TrainedClassifier | None] = [None] * len(detectors)
    if classifier_file is not None and Path(classifier_file).is_file():
        saved = torch.load(classifier_file, map_location="cpu", weights_only=True)
        classifiers = [TrainedClassifier.from_payload(p)
                       for p in saved.get("members", [saved])]
    return Ensemble([m["name"] for m in members], detectors, classifiers)


def differences(models: Mapping, tuned_for: Mapping | None) -> list[str]:
    """How the ``models`` (a ``record()``) differ from those ``tuned_for`` names; empty when
    each member is one of them, weights included (one fold of an ensemble is)."""
    if not isinstance(tuned_for, Mapping) or not isinstance(tuned_for.get("members"), Mapping):
        return ["it names no models (written before post-processing recorded them)"]
    recorded = tuned_for["members"]
    found = []
    for name, now in models["members"].items():
        then = recorded.get(name)
        if not isinstance(then, Mapping):
            found.append(f"{name} is not among its models ({', '.join(recorded)})")
            continue
        found += [f"{name}'s {part} is {now[part]}, it was tuned for {then.get(part)}"
                  for part in ("detector", "classifier") if then.get(part) != now[part]]
    return found


def tag_active_run(record: dict) -> None:
    """Tag the open MLflow run (if any) with the models a ``record()`` names, so runs can be
    searched by model (``tags.`models.version` = '...'``)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    tags = {"models.version": record["version"]}
    for name, member in record["members"].items():
        tags |= {f"models.{name}.{part}": str(version) for part, version in member.items()}
    mlflow.set_tags(tags)
