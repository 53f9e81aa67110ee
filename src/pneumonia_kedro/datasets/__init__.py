"""Kedro datasets the project needs and kedro-datasets does not have."""

from pneumonia_kedro.datasets.dicom_folder import DicomFolderDataset
from pneumonia_kedro.datasets.image_cache import ImageCacheDataset
from pneumonia_kedro.datasets.labels_csv import LabelsCSVDataset
from pneumonia_kedro.datasets.package_table import PackageTableDataset

__all__ = ["DicomFolderDataset", "ImageCacheDataset", "LabelsCSVDataset", "PackageTableDataset"]
