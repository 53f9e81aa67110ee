"""The classify pipeline."""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from .nodes import train_image_classifier


def create_pipeline(fold: int | None = None, **kwargs) -> Pipeline:
    """``fold``: the cross-validation fold this training is part of (its checkpoint folder
    and GPU), bound to the node; None for the one train/validation split."""
    func = train_image_classifier if fold is None else update_wrapper(
        partial(train_image_classifier, fold=fold), train_image_classifier)
    return Pipeline([
        Node(
            func=func,
            inputs=["train_image_cache", "validation_image_cache", "train_patients",
                    "validation_patients", "params:classifier", "params:engine"],
            outputs=["trained_classifier", "classifier_history", "classifier_metrics"],
            name="train_classifier_node",
        ),
    ])
