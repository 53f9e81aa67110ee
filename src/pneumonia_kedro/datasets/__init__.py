"""Kedro datasets the project needs and kedro-datasets does not have."""

from pneumonia_kedro.datasets.dicom_folder import DicomFolderDataset
from pneumonia_kedro.datasets.dicomweb import (
    DeliveryRecordDataset,
    DicomWebDataset,
    PacsServerDataset,
)
from pneumonia_kedro.datasets.image_cache import ImageCacheDataset, ImageCacheStateDataset
from pneumonia_kedro.datasets.labels_csv import LabelsCSVDataset
from pneumonia_kedro.datasets.mlflow_detector import MlflowDetectorDataset
from pneumonia_kedro.datasets.package_table import PackageTableDataset
from pneumonia_kedro.datasets.torch_model import TrainedModelDataset

__all__ = [
    "DeliveryRecordDataset",
    "DicomFolderDataset",
    "DicomWebDataset",
    "ImageCacheDataset",
    "ImageCacheStateDataset",
    "LabelsCSVDataset",
    "MlflowDetectorDataset",
    "PackageTableDataset",
    "PacsServerDataset",
    "TrainedModelDataset",
]
