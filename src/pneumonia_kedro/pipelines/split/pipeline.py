"""The split pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import split


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=split,
            inputs=["patients", "params:split"],
            outputs=["train_patients", "validation_patients", "split_report"],
            name="split_patients_node",
        ),
    ])
