"""The evaluate pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate, package_model, predict_validation, tune_threshold


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=predict_validation,
            inputs=["trained_model", "validation_image_cache", "params:evaluate"],
            outputs="raw_validation_predictions",
            name="predict_validation_node",
        ),
        Node(
            func=tune_threshold,
            inputs=["raw_validation_predictions", "validation_patients", "params:evaluate"],
            outputs=["postprocessing", "threshold_curve"],
            name="tune_score_threshold_node",
        ),
        Node(
            func=evaluate,
            inputs=["raw_validation_predictions", "validation_patients", "postprocessing",
                    "params:evaluate"],
            outputs=["evaluation_metrics", "evaluation_headline_metrics",
                     "validation_predictions"],
            name="evaluate_node",
        ),
        Node(
            func=package_model,
            inputs=["trained_model", "postprocessing", "params:serving"],
            outputs="mlflow_model",
            name="log_mlflow_model_node",
        ),
    ])
