"""pneumonia-kedro: Faster R-CNN for the RSNA Pneumonia Detection Challenge, as Kedro pipelines."""

__version__ = "0.1.0"
