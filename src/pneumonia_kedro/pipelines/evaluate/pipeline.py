"""The evaluate pipeline: the single model on the validation split (``split.folds: 1``)."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    evaluate,
    gather_ensemble,
    package_model,
    predict_validation,
    predict_validation_probabilities,
    tune_postprocessing,
)


def ensemble_node(members: list[str]) -> Node:
    """The node that makes ``ensemble`` of (detector, classifier) dataset pairs."""
    return Node(func=gather_ensemble, inputs=members, outputs="ensemble",
                name="gather_ensemble_node")


def prediction_nodes() -> list[Node]:
    """Raw boxes and classifier probabilities of ``ensemble`` on the validation patients'
    images (a fold maps these names to its own patients and the training cache)."""
    inputs = ["ensemble", "validation_image_cache", "validation_patients", "params:evaluate"]
    return [
        Node(
            func=predict_validation,
            inputs=inputs,
            outputs="raw_validation_predictions",
            name="predict_validation_node",
        ),
        Node(
            func=predict_validation_probabilities,
            inputs=inputs,
            outputs="validation_image_probabilities",
            name="predict_validation_probabilities_node",
        ),
    ]


def package_node() -> Node:
    return Node(
        func=package_model,
        inputs=["ensemble", "postprocessing", "params:serving", "params:quality",
                "appearance_reference"],
        outputs="mlflow_model",
        name="package_mlflow_model_node",
    )


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        ensemble_node(["trained_model", "trained_classifier"]),
        *prediction_nodes(),
        Node(
            func=tune_postprocessing,
            inputs=["ensemble", "raw_validation_predictions", "validation_patients",
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
        package_node(),
    ])
