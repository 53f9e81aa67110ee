"""The cross_validation pipeline (``split.folds`` > 1, registered in ``pipeline_registry.py``).

Each fold is the train and classify pipelines plus the validation prediction, instantiated in
its own namespace ``fold_i`` (``kedro run --namespaces fold_1`` trains that one; kedro-viz
shows each fold as a collapsible modular pipeline). All folds read the one training image
cache. Their out-of-fold predictions are collected, the post-processing is tuned on them,
and every fold's model, fused, is evaluated on the validation split and logged as one
MLflow model.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from pneumonia_kedro.pipelines import classify, train
from pneumonia_kedro.pipelines.evaluate.nodes import (
    evaluate,
    evaluate_delivered,
    tune_postprocessing,
)
from pneumonia_kedro.pipelines.evaluate.pipeline import (
    ensemble_node,
    package_node,
    prediction_nodes,
)
from pneumonia_kedro.pipelines.folds import fold_names, member_datasets
from pneumonia_kedro.split import fold_name

from .nodes import (
    assign_patient_folds,
    collect_histories,
    collect_out_of_fold,
    cross_validation_metrics,
)
from .nodes import select_fold as select_fold_patients

# Every fold trains and predicts with the same parameters (not namespaced ones).
FITTING_PARAMETERS = {"params:model", "params:train", "params:classifier", "params:engine"}


def fold_pipeline(index: int) -> Pipeline:
    """Fold ``index``: train the detector and classifier on every other fold's patients,
    predict its own."""
    namespace = fold_name(index)
    patients = {"train_patients": f"{namespace}.train_patients",
                "validation_patients": f"{namespace}.validation_patients"}
    # Every fold's patients are in the training cache: it serves as the validation cache.
    caches = {"train_image_cache": "train_image_cache",
              "validation_image_cache": "train_image_cache"}
    select = Node(
        # A named function (Kedro logs and kedro-viz show it), bound to this fold.
        func=update_wrapper(partial(select_fold_patients, fold=index), select_fold_patients),
        inputs="patient_folds",
        outputs=list(patients.values()),
        name="select_fold_patients_node",
        namespace=namespace,
    )
    # The fold index reaches the training nodes bound to them: their GPU and checkpoints.
    fitting = Pipeline(train.create_pipeline(fold=index) + classify.create_pipeline(fold=index),
                       namespace=namespace, inputs={**patients, **caches},
                       parameters=FITTING_PARAMETERS)
    predicting = Pipeline(
        [ensemble_node(["trained_model", "trained_classifier"]), *prediction_nodes()],
        namespace=namespace,
        inputs={"validation_patients": patients["validation_patients"],
                "validation_image_cache": "train_image_cache",
                "trained_model": f"{namespace}.trained_model",
                "trained_classifier": f"{namespace}.trained_classifier"},
        parameters={"params:evaluate"})
    return Pipeline([select]) + fitting + predicting


def create_pipeline(folds: int = 2) -> Pipeline:
    """``folds`` folds (2 or more; ``pipeline_registry.py`` passes ``split.folds``), their
    out-of-fold tuning and evaluation, and the fold ensemble."""
    if folds < 2:
        raise ValueError(f"cross-validation needs 2 or more folds, got {folds}")
    names = fold_names(folds)
    out_of_fold = ["raw_out_of_fold_predictions", "patient_folds",
                   "out_of_fold_image_probabilities"]
    return sum((fold_pipeline(i) for i in range(folds)), Pipeline([
        Node(
            func=assign_patient_folds,
            inputs=["train_patients", "params:split"],
            outputs="patient_folds",
            name="assign_folds_node",
        ),
    ])) + Pipeline([
        Node(
            func=collect_out_of_fold,
            inputs=[f"{fold}.raw_validation_predictions" for fold in names],
            outputs="raw_out_of_fold_predictions",
            name="collect_out_of_fold_predictions_node",
        ),
        Node(
            func=collect_out_of_fold,
            inputs=[f"{fold}.validation_image_probabilities" for fold in names],
            outputs="out_of_fold_image_probabilities",
            name="collect_out_of_fold_probabilities_node",
        ),
        Node(
            func=collect_histories,
            inputs=[f"{fold}.training_history" for fold in names],
            outputs="training_history",
            name="collect_training_histories_node",
        ),
        Node(
            func=tune_postprocessing,  # for the fold ensemble: inference checks its models
            inputs=["ensemble", *out_of_fold, "params:evaluate"],
            outputs=["postprocessing", "threshold_curve", "postprocessing_search"],
            name="tune_postprocessing_out_of_fold_node",
        ),
        Node(
            func=evaluate,
            inputs=[*out_of_fold, "postprocessing", "params:evaluate"],
            outputs=["out_of_fold_metrics", "out_of_fold_headline_metrics",
                     "out_of_fold_predictions"],
            name="evaluate_out_of_fold_node",
        ),
        ensemble_node(member_datasets(folds)),
        *prediction_nodes(),
        Node(
            func=evaluate_delivered,
            inputs=["raw_validation_predictions", "validation_patients",
                    "validation_image_probabilities", "postprocessing", "params:evaluate"],
            outputs=["ensemble_validation_metrics", "evaluation_headline_metrics",
                     "validation_predictions"],
            name="evaluate_ensemble_node",
        ),
        Node(
            func=cross_validation_metrics,
            inputs=["out_of_fold_metrics", "ensemble_validation_metrics", "patient_folds"],
            outputs="evaluation_metrics",
            name="combine_cross_validation_metrics_node",
        ),
        package_node(),
    ])
