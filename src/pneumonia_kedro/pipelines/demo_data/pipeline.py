"""The demo_data pipeline: it writes the raw datasets the other pipelines read, so that one
run may generate and use them (``--pipelines demo_data,ingest``). Only the demo environment
lets it: elsewhere the raw datasets are read-only."""

from kedro.pipeline import Node, Pipeline

from .nodes import describe_generation, render_images, sample_patients, sample_submission


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=sample_patients,
            inputs=["rsna_reference_labels", "rsna_reference_headers", "params:demo_data"],
            outputs=["train_labels", "class_info", "demo_train_patients",
                     "demo_test_patients"],
            name="sample_demo_patients_node",
        ),
        Node(
            func=render_images,
            inputs=["demo_train_patients", "params:demo_data"],
            outputs="train_dicoms",
            name="render_demo_train_images_node",
        ),
        Node(
            func=render_images,
            inputs=["demo_test_patients", "params:demo_data"],
            outputs="test_dicoms",
            name="render_demo_test_images_node",
        ),
        Node(
            func=sample_submission,
            inputs="demo_test_patients",
            outputs="sample_submission",
            name="write_demo_sample_submission_node",
        ),
        Node(
            func=describe_generation,
            inputs=["train_labels", "train_dicoms", "test_dicoms", "sample_submission",
                    "params:demo_data"],
            outputs="demo_data_manifest",
            name="describe_demo_generation_node",
        ),
    ])
