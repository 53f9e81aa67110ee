"""The image-level opacity classifier: does this chest X-ray show lung opacity at all?

Every top RSNA solution gated its detector with one: a detector alone must decide "no box"
from the absence of confident boxes, a classifier sees the whole image. A torchvision
classification network (architecture and weights as parameters; ``none`` trains from scratch)
is trained on the same image cache as the detector, positive where the patient has a box.
Its probability is combined with box scores by the gating rule the post-processing search
picks (``postprocess.GatingConfig``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, default_collate

from pneumonia_kedro.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, Range
from pneumonia_kedro.engines import EngineConfig
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.inference import CachedImages
from pneumonia_kedro.models import weights_version, with_download
from pneumonia_kedro.pretrained import load_weights_file
from pneumonia_kedro.training import CheckpointStore, Optimisation, TrainingResult, fit_task
from pneumonia_kedro.training.engine import EpochCallback

logger = logging.getLogger(__name__)

Architecture = Literal["resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0",
                       "mobilenet_v3_small", "mobilenet_v3_large"]
# Networks take ImageNet-normalised RGB: the grey image goes to all three channels.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class ClassifierConfig:
    """Network, weights, input size and the training recipe of the image-level classifier."""

    RANGES = {"image_size": AT_LEAST_ONE, "epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE,
              "learning_rate": Range(0, low_open=True), "weight_decay": Range(0),
              "horizontal_flip": PROBABILITY, "grad_clip_norm": POSITIVE,
              "num_workers": NON_NEGATIVE, "world_size": AT_LEAST_ONE}

    architecture: Architecture = "resnet18"
    pretrained: str = "imagenet"  # imagenet | none | path/to/weights.pth
    partial_weights: bool = False  # true: a weights file that fits only in part loads what fits
    image_size: int | None = None  # None: the image cache's size
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.001
    weight_decay: float = 0.0001
    horizontal_flip: float = 0.5
    seed: int = 42
    device: str = "auto"
    amp: bool = True  # on CUDA only
    channels_last: bool = True  # on CUDA only
    grad_clip_norm: float | None = None
    num_workers: int = 0
    resume: bool = True  # from a last checkpoint of the same settings and data
    checkpoint_folder: str | None = None
    world_size: int | Literal["auto"] = 1  # DDP processes, as train.world_size
    progress: bool = True


def build_classifier(architecture: str, pretrained: str = "none",
                     partial_weights: bool = False) -> nn.Module:
    """A torchvision classification network with one output: the opacity logit.

    ``pretrained``: imagenet, none, or a weights file (``classifier.pretrained``) that must fit
    the network, its 1000-class head aside, unless ``partial_weights``."""
    weights = None
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(architecture).DEFAULT
    model = with_download(lambda: torchvision.models.get_model(architecture, weights=weights),
                          weights, "ImageNet", "classifier.pretrained") if weights else \
        torchvision.models.get_model(architecture, weights=None)
    head = _replace_head(model)
    if pretrained not in ("imagenet", "none"):
        # After the new head: an ImageNet file's head differs, a trained classifier's fits.
        load_weights_file(model, Path(pretrained), "classifier", partial_weights, head=(head,))
    return model


def check_weights_file(config: ClassifierConfig) -> None:
    """Read and fit a weights file that ``classifier.pretrained`` names (nothing is
    downloaded): a run can refuse it before its first node."""
    if config.pretrained not in ("imagenet", "none"):
        build_classifier(config.architecture, config.pretrained, config.partial_weights)


def _replace_head(model: nn.Module) -> str:
    """One opacity logit instead of the 1000 ImageNet classes; the new layer's name prefix."""
    if hasattr(model, "fc"):  # resnets
        model.fc = nn.Linear(model.fc.in_features, 1)
        return "fc."
    # densenet: a Linear; efficientnet and mobilenet: a Sequential ending in one
    head = model.classifier
    last = head[-1] if isinstance(head, nn.Sequential) else head
    replacement = nn.Linear(last.in_features, 1)
    if isinstance(head, nn.Sequential):
        head[-1] = replacement
        return f"classifier.{len(head) - 1}."
    model.classifier = replacement
    return "classifier."


def to_classifier_input(images: torch.Tensor, image_size: int, device: torch.device
                        ) -> torch.Tensor:
    """uint8 (B, 1, S, S) -> normalised float (B, 3, size, size) on ``device``."""
    batch = images.to(device).float().div_(255.0)
    if batch.shape[-1] != image_size:
        batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=True)
    return (batch.expand(-1, 3, -1, -1) - _MEAN.to(device)) / _STD.to(device)


def roc_auc(targets: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC, NaN when the images hold only one class."""
    from sklearn.metrics import roc_auc_score

    targets = np.asarray(targets, dtype=int)
    return float(roc_auc_score(targets, probabilities)) if len(np.unique(targets)) == 2 \
        else float("nan")


@dataclass
class TrainedClassifier:
    """A trained classifier as data: architecture, input size, weights and how it was chosen."""

    architecture: str
    image_size: int
    state_dict: dict
    info: dict

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        model = build_classifier(self.architecture, "none")
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    @property
    def version(self) -> str:
        return weights_version(self.architecture, self.state_dict)

    def to_payload(self) -> dict:
        return {"model_config": {"architecture": self.architecture,
                                 "image_size": self.image_size},
                "state_dict": self.state_dict, "info": self.info}

    @classmethod
    def from_payload(cls, payload: dict) -> TrainedClassifier:
        return cls(payload["model_config"]["architecture"],
                   int(payload["model_config"]["image_size"]), payload["state_dict"],
                   payload["info"])


class _LabelledImages(CachedImages):
    """The cache's images of the patients of ``targets``, each with its 0/1 target."""

    def __init__(self, cache: ImageCache, targets: pd.Series) -> None:
        super().__init__(cache, list(targets.index))
        patient_ids = [record["patientId"] for record in self.records]
        self.targets = targets.reindex(patient_ids).to_numpy(np.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return super().__getitem__(index), torch.tensor(self.targets[index])


@torch.inference_mode()
def classify(model: nn.Module, images: torch.Tensor, image_size: int, device: torch.device,
             hflip: bool = False) -> np.ndarray:
    """Opacity probability per uint8 image (B, 1, S, S); with ``hflip`` the mean over the
    image and its mirror (the same test-time variant the detector uses)."""
    model.eval()
    logits = model(to_classifier_input(images, image_size, device)).float().squeeze(1)
    probabilities = torch.sigmoid(logits)
    if hflip:
        mirrored = model(to_classifier_input(images.flip(-1), image_size, device))
        probabilities = (probabilities + torch.sigmoid(mirrored.float().squeeze(1))) / 2
    return probabilities.cpu().numpy().astype(np.float64)


def predict_probabilities(classifier: TrainedClassifier, cache: ImageCache,
                          device: torch.device, batch_size: int = 64, hflip: bool = False,
                          patient_ids: list[str] | None = None) -> pd.Series:
    """Opacity probability of each usable image of ``cache``, indexed by patientId."""
    data = CachedImages(cache, patient_ids)
    model = classifier.build(device)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    values = [classify(model, images, classifier.image_size, device, hflip)
              for images in loader]
    patient_ids = [record["patientId"] for record in data.records]
    return pd.Series(np.concatenate(values) if values else np.zeros(0),
                     index=pd.Index(patient_ids, name="patientId"), name="probability")


def _cosine_per_step(optimizer: torch.optim.Optimizer, total_steps: int
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the learning rate to 0 over every step of the run."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps)
                                                     / total_steps)))


@dataclass
class ClassifierTask:
    """The classifier as a ``training.TrainingTask``: AdamW with a per-step cosine decay,
    random horizontal flips, binary cross-entropy, best epoch by validation ROC AUC."""

    config: ClassifierConfig
    image_size: int
    train_data: _LabelledImages
    validation_data: _LabelledImages

    name: ClassVar[str] = "classifier epoch"
    params: ClassVar[str] = "classifier"
    metric: ClassVar[str] = "validation_roc_auc"
    higher_is_better: ClassVar[bool] = True
    collate = staticmethod(default_collate)

    def build(self) -> nn.Module:
        return build_classifier(self.config.architecture, self.config.pretrained,
                                self.config.partial_weights)

    def optimisation(self, model: nn.Module, steps_per_epoch: int) -> Optimisation:
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.config.learning_rate,
                                      weight_decay=self.config.weight_decay)
        total_steps = max(1, self.config.epochs * steps_per_epoch)
        return Optimisation(optimizer, per_step=_cosine_per_step(optimizer, total_steps))

    def to_device(self, batch: tuple, device: torch.device, channels_last: bool) -> tuple:
        images, targets = batch
        flip = torch.rand(len(images)) < self.config.horizontal_flip  # seeded per epoch
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        inputs = to_classifier_input(images, self.image_size, device)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets.to(device)

    def losses(self, model: nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        logits = model(inputs).squeeze(1)
        return {"loss": F.binary_cross_entropy_with_logits(logits.float(), targets)}

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        data = self.validation_data
        loader = DataLoader(data, batch_size=self.config.batch_size * 2)
        probabilities = np.concatenate(
            [classify(model, images, self.image_size, device) for images, _ in loader]) \
            if len(data) else np.zeros(0)
        return {"validation_roc_auc": roc_auc(data.targets == 1, probabilities)}


def train_classifier(train_cache: ImageCache, train_targets: pd.Series,
                     validation_cache: ImageCache, validation_targets: pd.Series,
                     config: ClassifierConfig, checkpoints: CheckpointStore | None = None,
                     on_epoch_end: EpochCallback | None = None, fold: int | None = None,
                     engine: EngineConfig | None = None
                     ) -> tuple[TrainedClassifier, TrainingResult]:
    """Train on the training split through the detector's engine (``training.fit_task``: AMP,
    checkpoints and resume, DDP), keep the epoch with the best validation ROC AUC.

    ``*_targets``: 0/1 per patientId. Returns the classifier and the training result.
    """
    image_size = config.image_size or train_cache.image_size
    task = ClassifierTask(config, image_size, _LabelledImages(train_cache, train_targets),
                          _LabelledImages(validation_cache, validation_targets))
    result = fit_task(task, config, checkpoints, on_epoch_end, fold, engine)
    info = {"best_epoch": result.best_epoch, "validation_roc_auc": result.best_metric,
            "config": asdict(config)}
    return TrainedClassifier(config.architecture, image_size, result.best_state, info), result
