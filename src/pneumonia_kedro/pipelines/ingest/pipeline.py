"""The ingest pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import attach_images, read_dicom_headers, validate_patients


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(
            func=validate_patients,
            inputs=["train_labels", "class_info", "params:ingest"],
            outputs=["labelled_patients", "label_checks"],
            name="validate_labels_node",
        ),
        Node(
            func=read_dicom_headers,
            inputs=["labelled_patients", "train_dicoms"],
            outputs="dicom_headers",
            name="read_dicom_headers_node",
        ),
        Node(
            func=attach_images,
            inputs=["labelled_patients", "dicom_headers", "train_dicoms", "label_checks",
                    "params:ingest"],
            outputs=["patients", "ingest_report"],
            name="build_patient_table_node",
        ),
    ])
