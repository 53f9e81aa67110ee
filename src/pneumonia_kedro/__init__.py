"""pneumonia-kedro: torchvision detectors (Faster R-CNN, FCOS) for the RSNA Pneumonia
Detection Challenge, as Kedro pipelines."""

__version__ = "0.1.0"
