"""Local pretrained weights files (``model.pretrained``, ``classifier.pretrained``).

A file is read with ``torch.load(weights_only=True)``, which runs no code from it; a file that
is not a state_dict of tensors is refused with its path and the setting that named it (and
never with torch's advice to turn that protection off). A file must fit the network: every
tensor of the network, except the head the project replaces (its class count differs), must
be in the file with the same shape, and the file must hold nothing else. Otherwise the
network would train mostly from scratch under a pretrained name. ``<group>.partial_weights:
true`` asks for a partial load on purpose: what fits is loaded, with a warning.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from pneumonia_kedro.errors import WeightsUnavailableError

logger = logging.getLogger(__name__)


def _not_counted(name: str) -> bool:
    # BatchNorm's step counter: absent from files of frozen-BatchNorm (pretrained) networks.
    return name.endswith("num_batches_tracked")


def read_state_dict(path: Path, group: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a state_dict, or a checkpoint holding one under
    ``state_dict`` or ``model``), read without running code from the file."""
    key = f"{group}.pretrained"
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{path}: weights file not found ({key}): give the path of an existing weights "
            "file, or one of the named weights")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False, which would run the file's code.
        reason = ("it holds Python objects, not only tensors (a whole pickled model, or a "
                  "checkpoint with its optimiser's objects): save the network's state_dict() "
                  "with torch.save and name that file") \
            if "Weights only load failed" in str(exc) else \
            "not a PyTorch weights file (a state_dict saved with torch.save)"
        raise WeightsUnavailableError(f"{path} ({key}): {reason}") from None
    except Exception as exc:  # the unpickler fails on other bytes in many ways (IndexError...)
        raise WeightsUnavailableError(
            f"{path} ({key}): not a PyTorch weights file (a state_dict saved with "
            f"torch.save): {type(exc).__name__}") from None
    state = payload
    if isinstance(payload, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(payload.get(wrapper), dict):
                state = payload[wrapper]
                break
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsUnavailableError(
            f"{path} ({key}): not a state_dict (a mapping of tensor names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def _misfits(own: dict, state: dict, head: tuple[str, ...]) -> list[str]:
    """What keeps the file from fitting: missing, other shape, not in the network."""
    counted = [k for k in own if not _not_counted(k) and not k.startswith(head)]
    missing = [k for k in counted if k not in state]
    shaped = [k for k in counted if k in state and state[k].shape != own[k].shape]
    extra = [k for k in state if k not in own and not _not_counted(k)
             and not k.startswith(head)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the network's tensors are not in the file "
                        f"(first: '{missing[0]}')")
    if shaped:
        name = shaped[0]
        problems.append(f"{len(shaped)} have another shape (first: '{name}' is "
                        f"{_shape(state[name])} in the file, {_shape(own[name])} in the "
                        "network)")
    if extra:
        problems.append(f"{len(extra)} of the file's tensors are not in the network "
                        f"(first: '{extra[0]}')")
    return problems


def load_weights_file(model: nn.Module, path: Path, group: str, partial: bool = False,
                      head: tuple[str, ...] = ()) -> None:
    """Load the weights file ``path`` (named by ``<group>.pretrained``) into ``model``.

    ``head``: name prefixes of the layers the project replaces, which need not fit. Refused
    unless every other tensor fits, or ``partial`` (``<group>.partial_weights``) is set.
    """
    state = read_state_dict(path, group)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    label = type(model).__name__
    counts = (f"{len(fitting)} of the network's {len(own)} tensors are in the file's "
              f"{len(state)} with the same shape")
    if not fitting:
        raise WeightsUnavailableError(
            f"{path} ({group}.pretrained) does not fit the {label}: none of its {len(state)} "
            "tensors matches the network's names and shapes (weights of another network?)")
    problems = _misfits(own, state, head)
    if problems and not partial:
        raise WeightsUnavailableError(
            f"{path} ({group}.pretrained) does not fit the {label}: {counts}; "
            f"{'; '.join(problems)}. Give weights of the same architecture, or set "
            f"{group}.partial_weights: true to load only the tensors that fit (the others "
            "start untrained)")
    model.load_state_dict(fitting, strict=False)
    if problems:
        logger.warning("%s (%s.partial_weights: true): loaded only what fits: %s; %s", path,
                       group, counts, "; ".join(problems))
    else:
        logger.info("loaded %s: %s", path, counts)
