"""The demo_data pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import render_images, sample_patients, sample_submission


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=sample_patients,
            inputs=["rsna_reference_labels", "rsna_reference_headers", "params:demo_data"],
            outputs=["demo_train_labels", "demo_class_info", "demo_train_patients",
                     "demo_test_patients"],
            name="sample_demo_patients_node",
        ),
        Node(
            func=render_images,
            inputs=["demo_train_patients", "params:demo_data"],
            outputs="demo_train_images",
            name="render_demo_train_images_node",
        ),
        Node(
            func=render_images,
            inputs=["demo_test_patients", "params:demo_data"],
            outputs="demo_test_images",
            name="render_demo_test_images_node",
        ),
        Node(
            func=sample_submission,
            inputs="demo_test_patients",
            outputs="demo_sample_submission",
            name="write_demo_sample_submission_node",
        ),
    ])
