"""The deliver pipeline: overlays from the SRs, then everything the PACS lacks, sent (the
GSPS, when ``deliver.presentation_state`` is on, is built as it is sent)."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_secondary_captures, check_delivery, deliver_results


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=build_secondary_captures,
            inputs=["structured_reports", "test_dicoms", "params:deliver"],
            outputs="pacs_secondary_captures",
            name="build_secondary_captures_node",
        ),
        Node(
            func=deliver_results,
            inputs=["structured_reports", "pacs_secondary_captures", "test_dicoms", "pacs_server",
                    "previous_delivery_report", "params:deliver"],
            outputs="delivery_report",
            name="deliver_node",
        ),
        # Separate, so the report is saved before a failed delivery stops the run.
        Node(
            func=check_delivery,
            inputs="delivery_report",
            outputs=None,
            name="check_delivery_node",
        ),
    ])
