"""Where the PACS is and how to talk to it: DICOMweb (QIDO/WADO/STOW-RS) and DIMSE (C-STORE).

The password is never part of a message, a ``repr`` or a log line: errors name the server by
its URL without credentials (``PacsServer.dicomweb_name``) or ``AE@host:port`` for DIMSE.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import requests

from pneumonia_kedro.errors import PneumoniaKedroError


class PacsError(PneumoniaKedroError, RuntimeError):
    """The PACS cannot be reached, refuses the credentials, or refuses or loses an object."""


@dataclass(frozen=True)
class PacsServer:
    """One PACS: its DICOMweb endpoint and/or its DICOM (DIMSE) node, and how to log in."""

    dicomweb_url: str | None = None  # e.g. https://pacs.example.org/dicom-web
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # TLS: True verifies against the system's CAs, a path against that CA bundle; a client
    # certificate (PEM, or (certificate, key)) for servers that ask for one.
    verify: bool | str = True
    client_cert: str | tuple[str, str] | None = None
    timeout: float = 30.0  # seconds for one request or association step
    dimse_host: str | None = None
    dimse_port: int = 104
    called_ae: str = "ANY-SCP"
    calling_ae: str = "PNEUMONIA"
    dimse_tls: bool = False

    @property
    def dicomweb_name(self) -> str:
        """The DICOMweb URL without any user or password in it."""
        if not self.dicomweb_url:
            return "(no DICOMweb URL configured)"
        parts = urlsplit(self.dicomweb_url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))

    @property
    def dimse_name(self) -> str:
        return f"{self.called_ae}@{self.dimse_host}:{self.dimse_port}"

    def name(self, protocol: str) -> str:
        return self.dimse_name if protocol == "c_store" else self.dicomweb_name

    def configured(self, protocol: str) -> bool:
        return bool(self.dimse_host if protocol == "c_store" else self.dicomweb_url)


def http_session(server: PacsServer) -> requests.Session:
    """A requests session with the server's login and TLS options."""
    session = requests.Session()
    if server.username is not None:
        session.auth = (server.username, server.password or "")
    session.verify = server.verify
    if server.client_cert:
        session.cert = tuple(server.client_cert) if isinstance(server.client_cert, list) \
            else server.client_cert
    return session


def dicomweb_client(server: PacsServer, session: requests.Session):
    """A ``DICOMwebClient`` for the server over ``session`` (from ``http_session``; whoever
    made the session closes it), with credentials stripped from the URL it logs."""
    from dicomweb_client.api import DICOMwebClient

    if not server.dicomweb_url:
        raise PacsError("no DICOMweb URL configured: set it in conf/local/credentials.yml "
                        "(pacs: {url: ...}) or the environment variable PACS_DICOMWEB_URL")
    client = DICOMwebClient(url=server.dicomweb_name, session=session, timeout=server.timeout)
    # A refusal or a full PACS is answered once, clearly; retries would hide it for minutes.
    client.set_http_retry_params(retry=False)
    return client


@contextmanager
def dicomweb(server: PacsServer) -> Iterator:
    """A ``DICOMwebClient`` on one session (one login, kept-alive connections), closed after."""
    session = http_session(server)
    try:
        yield dicomweb_client(server, session)
    finally:
        session.close()


def tls_context(server: PacsServer) -> ssl.SSLContext:
    """The TLS context for a DIMSE association (``dimse_tls``)."""
    cafile = server.verify if isinstance(server.verify, str) else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if server.verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if server.client_cert:
        cert = server.client_cert
        certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
        context.load_cert_chain(certfile, keyfile)
    return context


def http_failure(server: PacsServer, what: str, exc: Exception) -> PacsError:
    """A message naming the server and the object, never the request's query string (it may
    hold an accession number) nor the password."""
    name = server.dicomweb_name
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return PacsError(f"DICOMweb server {name} refused the credentials of user "
                             f"{server.username!r} (HTTP {code}) while {what}: check the user "
                             "and password (conf/local/credentials.yml or PACS_USERNAME / "
                             "PACS_PASSWORD)")
        return PacsError(f"DICOMweb server {name}: {what} failed: HTTP {code} "
                         f"{exc.response.reason}")
    if isinstance(exc, requests.Timeout):
        return PacsError(f"DICOMweb server {name} did not answer within {server.timeout} s "
                         f"while {what}")
    if isinstance(exc, requests.ConnectionError):
        return PacsError(f"DICOMweb server {name} cannot be reached while {what} "
                         "(connection refused or lost): is it running?")
    return PacsError(f"DICOMweb server {name}: {what} failed ({type(exc).__name__})")


def is_fatal(exc: Exception) -> bool:
    """Whether a failure concerns the server (down, slow, wrong login), not one object."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code in (401, 403)
    return isinstance(exc, requests.RequestException)
