"""The classify pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import train_image_classifier


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=train_image_classifier,
            inputs=["train_image_cache", "validation_image_cache", "train_patients",
                    "validation_patients", "params:classifier"],
            outputs=["trained_classifier", "classifier_history"],
            name="train_classifier_node",
        ),
    ])
