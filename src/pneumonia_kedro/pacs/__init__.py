"""The PACS round trip: images in over DICOMweb, results (SR + overlay) out by STOW-RS or
C-STORE, with a delivery record so that nothing is sent twice or lost. No Kedro here."""

from pneumonia_kedro.pacs.server import PacsError, PacsServer

__all__ = ["PacsError", "PacsServer"]
