"""The cache pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import plan_cache, report_cache


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=plan_cache,
            inputs=["train_patients", "train_dicoms", "params:cache",
                    "params:ingest"],
            outputs="train_image_cache",
            name="cache_train_images_node",
        ),
        Node(
            func=plan_cache,
            inputs=["validation_patients", "train_dicoms", "params:cache",
                    "params:ingest"],
            outputs="validation_image_cache",
            name="cache_validation_images_node",
        ),
        Node(
            func=report_cache,
            inputs=["train_image_cache", "validation_image_cache"],
            outputs="cache_report",
            name="report_cache_node",
        ),
    ])
