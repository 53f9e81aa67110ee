"""The inference pipeline."""

from kedro.pipeline import Node, Pipeline

from pneumonia_kedro.pipelines.evaluate.pipeline import ensemble_node
from pneumonia_kedro.pipelines.folds import member_datasets

from .nodes import (
    cache_test_images,
    draw_overlays,
    predict_test,
    write_structured_reports,
    write_submission,
)


def create_pipeline(**kwargs) -> Pipeline:
    folds = kwargs.get("folds", 1)  # split.folds, passed by pipeline_registry.py
    return Pipeline([
        # Every fold's model with split.folds > 1 (inference.models may pick one).
        ensemble_node(member_datasets(folds)),
        Node(
            func=cache_test_images,
            inputs=["test_dicoms", "ensemble", "params:inference", "params:quality",
                    "appearance_reference", "test_image_cache_state", "params:engine"],
            outputs="test_image_cache",
            name="cache_test_images_node",
        ),
        Node(
            func=predict_test,
            inputs=["ensemble", "test_image_cache", "postprocessing", "params:inference",
                    "params:engine"],
            outputs="test_boxes",  # saved as test_predictions with the submission
            name="predict_test_node",
        ),
        # The SRs first, whole or not at all (written aside, swapped in at the last chunk);
        # then the submission, report and predictions, saved together by one node: a run
        # that stops before leaves the earlier run's outputs as they were.
        Node(
            func=write_structured_reports,
            inputs=["test_boxes", "test_image_cache", "test_dicoms", "ensemble",
                    "params:inference", "sample_submission"],
            outputs=["structured_reports", "structured_report_skips"],
            name="write_structured_reports_node",
        ),
        Node(
            func=write_submission,
            inputs=["test_boxes", "test_image_cache", "test_dicoms", "sample_submission",
                    "structured_report_skips", "params:inference", "ensemble"],
            outputs=["submission", "inference_report", "test_predictions"],
            name="write_submission_node",
        ),
        Node(
            func=draw_overlays,
            inputs=["test_boxes", "test_image_cache", "params:inference"],
            outputs="test_overlays",
            name="draw_test_overlays_node",
        ),
    ])
