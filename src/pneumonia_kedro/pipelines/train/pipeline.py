"""The train pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import train


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=train,
            inputs=["train_image_cache", "validation_image_cache", "train_patients",
                    "validation_patients", "training_checkpoints", "params:model",
                    "params:train"],
            outputs=["trained_model", "training_history"],
            name="train_detector_node",
        ),
    ])
