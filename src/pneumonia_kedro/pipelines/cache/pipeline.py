"""The cache pipeline: each split's images decoded by a generator node, chunk by chunk."""

from kedro.pipeline import Node, Pipeline

from .nodes import cache_images, calibrate_appearance, report_cache


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        *(Node(
            func=cache_images,
            # The state is a read-only view of the same folder: what is already finished.
            inputs=[f"{split}_patients", "train_dicoms", "params:cache", "params:quality",
                    f"{split}_image_cache_state", "params:engine"],
            outputs=f"{split}_image_cache",
            name=f"cache_{split}_images_node",
        ) for split in ("train", "validation")),
        Node(
            func=calibrate_appearance,
            inputs=["train_image_cache", "params:quality"],
            outputs="appearance_reference",
            name="calibrate_appearance_node",
        ),
        Node(
            func=report_cache,
            inputs=["train_image_cache", "validation_image_cache"],
            outputs="cache_report",
            name="report_cache_node",
        ),
    ])
