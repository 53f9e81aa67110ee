"""The report pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import curve_figures, prediction_gallery, sample_figure, write_report


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=sample_figure,
            inputs=["train_image_cache", "train_patients"],
            outputs="samples_figure",
            name="plot_samples_node",
        ),
        Node(
            func=prediction_gallery,
            inputs=["validation_image_cache", "validation_patients", "validation_predictions"],
            outputs="prediction_gallery_figure",
            name="plot_prediction_gallery_node",
        ),
        Node(
            func=curve_figures,
            inputs=["raw_validation_predictions", "validation_patients", "evaluation_metrics",
                    "threshold_curve", "training_history"],
            outputs="curve_figures",
            name="plot_curves_node",
        ),
        Node(
            func=write_report,
            inputs=["evaluation_metrics", "split_report", "cache_report", "training_history"],
            outputs="evaluation_report",
            name="write_evaluation_report_node",
        ),
    ])
