"""The project's own error types: each message names the file (and row) and what is wrong."""


class PneumoniaKedroError(Exception):
    """Base class for every error this project raises on bad input or configuration."""


class LabelsError(PneumoniaKedroError, ValueError):
    """A labels or class-info CSV breaks the competition's format."""


class DicomError(PneumoniaKedroError, ValueError):
    """A file cannot become one grayscale image."""


class BoxError(PneumoniaKedroError, ValueError):
    """Boxes that are not finite numbers of shape (N, 4), or an image size that is not positive."""


class MissingDataError(PneumoniaKedroError, FileNotFoundError):
    """Input data is not where the configuration says it is."""


class WeightsUnavailableError(PneumoniaKedroError, RuntimeError):
    """Pretrained weights cannot be downloaded and no local file was given."""
