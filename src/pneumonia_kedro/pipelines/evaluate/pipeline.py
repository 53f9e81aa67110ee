"""The evaluate pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    evaluate,
    package_model,
    predict_validation,
    predict_validation_probabilities,
    tune_postprocessing,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=predict_validation,
            inputs=["trained_model", "validation_image_cache", "params:evaluate"],
            outputs="raw_validation_predictions",
            name="predict_validation_node",
        ),
        Node(
            func=predict_validation_probabilities,
            inputs=["trained_classifier", "validation_image_cache", "params:evaluate"],
            outputs="validation_image_probabilities",
            name="predict_validation_probabilities_node",
        ),
        Node(
            func=tune_postprocessing,
            inputs=["raw_validation_predictions", "validation_patients",
                    "validation_image_probabilities", "params:evaluate"],
            outputs=["postprocessing", "threshold_curve", "postprocessing_search"],
            name="tune_postprocessing_node",
        ),
        Node(
            func=evaluate,
            inputs=["raw_validation_predictions", "validation_patients",
                    "validation_image_probabilities", "postprocessing", "params:evaluate"],
            outputs=["evaluation_metrics", "evaluation_headline_metrics",
                     "validation_predictions"],
            name="evaluate_node",
        ),
        Node(
            func=package_model,
            inputs=["trained_model", "trained_classifier", "postprocessing", "params:serving"],
            outputs="mlflow_model",
            name="log_mlflow_model_node",
        ),
    ])
