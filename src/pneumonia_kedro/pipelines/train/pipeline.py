"""The train pipeline."""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from .nodes import train


def create_pipeline(fold: int | None = None, **kwargs) -> Pipeline:
    """``fold``: the cross-validation fold this training is part of (its checkpoint folder
    and GPU), bound to the node; None for the one train/validation split."""
    # A named function (Kedro logs and kedro-viz show it), bound to the fold.
    func = train if fold is None else update_wrapper(partial(train, fold=fold), train)
    return Pipeline([
        Node(
            func=func,
            inputs=["train_image_cache", "validation_image_cache", "train_patients",
                    "validation_patients", "params:model", "params:train", "params:engine"],
            outputs=["trained_model", "training_history", "training_metrics"],
            name="train_detector_node",
        ),
    ])
