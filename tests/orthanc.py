"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on 127.0.0.1.

Started like a test database: free ports, a temporary storage folder, HTTP basic
authentication, and stopped after the tests (``make test`` installs the Debian packages
``orthanc`` and ``orthanc-dicomweb``; where they are missing the tests say so and skip, or fail
under ``CI``). ``stop()`` and ``start()`` keep the storage, so a test can take the PACS down in
the middle of a delivery and bring it back with everything it had stored.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import requests

from pneumonia_kedro.ui import free_port

ORTHANC = "Orthanc"
PLUGIN_FOLDER = Path("/usr/share/orthanc/plugins")
PLUGINS = ("libOrthancDicomWeb.so", "libOrthancWebViewer.so")
USER, PASSWORD = "pneumonia", "s3cret-for-tests"
AET = "TESTPACS"


def missing_parts() -> list[str]:
    """What this machine lacks to run the PACS tests (Debian package names)."""
    missing = []
    if shutil.which(ORTHANC) is None:
        missing.append("orthanc")
    if not (PLUGIN_FOLDER / PLUGINS[0]).exists():
        missing.append("orthanc-dicomweb")
    return missing


def require_orthanc() -> None:
    """Skip (fail under CI) with the packages to install when Orthanc cannot run here."""
    import pytest  # here, so that docs/screenshots.py imports this module without pytest

    missing = missing_parts()
    if missing:
        message = (f"Debian package(s) {', '.join(missing)} not installed: `make pacs-tools` "
                   "(part of `make test`) installs them")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class Orthanc:
    """One Orthanc process with its own storage, HTTP (REST + DICOMweb) and DICOM ports."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        # Its own name: a restart must not take another test's Orthanc (started meanwhile on
        # the freed port by the other pytest worker) for this one.
        self.name = f"pneumonia-kedro-tests-{uuid.uuid4().hex[:12]}"
        self.process: subprocess.Popen | None = None
        self.log = folder / "orthanc.log"
        config = {
            "Name": self.name,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            # Only this machine may connect; a password like a hospital PACS would have.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomAlwaysAllowStore": True,
            "OverwriteInstances": False,
            "StableAge": 1,
            "Plugins": [str(PLUGIN_FOLDER / name) for name in PLUGINS
                        if (PLUGIN_FOLDER / name).exists()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1"},
            "WebViewer": {"CachePath": str(folder / "webviewer-cache")},
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if self.get("/system").get("Name") == self.name:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s: {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> object:
        answer = requests.get(self.url + path, auth=(USER, PASSWORD), timeout=30)
        answer.raise_for_status()
        return answer.json()

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file through the REST API (as a modality would send it)."""
        answer = requests.post(self.url + "/instances", data=data, auth=(USER, PASSWORD),
                               timeout=60)
        answer.raise_for_status()
        return answer.json()

    def instance_tags(self, sop_instance_uid: str) -> dict:
        """The simplified main tags of the instance with this SOP Instance UID."""
        found = self.find("Instance", {"SOPInstanceUID": sop_instance_uid})
        assert len(found) == 1, f"{len(found)} instances with SOPInstanceUID {sop_instance_uid}"
        return found[0]

    def find(self, level: str, query: dict) -> list[dict]:
        answer = requests.post(self.url + "/tools/find", auth=(USER, PASSWORD), timeout=30,
                               json={"Level": level, "Query": query, "Expand": True})
        answer.raise_for_status()
        return answer.json()

    def file(self, orthanc_id: str) -> bytes:
        answer = requests.get(f"{self.url}/instances/{orthanc_id}/file", auth=(USER, PASSWORD),
                              timeout=60)
        answer.raise_for_status()
        return answer.content

    def clear(self) -> None:
        """Delete every patient (and so every study and instance)."""
        for patient in self.get("/patients"):
            requests.delete(f"{self.url}/patients/{patient}", auth=(USER, PASSWORD),
                            timeout=30).raise_for_status()


def running_orthanc(folder: Path):
    """Generator for fixtures: a started Orthanc in ``folder``, stopped afterwards."""
    require_orthanc()
    server = Orthanc(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def connections_to(port: int) -> int:
    """This process's open TCP connections to ``port`` (Linux ``/proc``): a client session
    left open keeps one."""
    sockets = set()
    for descriptor in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:["):-1])
    count = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port, state, inode = int(fields[2].split(":")[1], 16), fields[3], fields[9]
        count += remote_port == port and state == "01" and inode in sockets  # ESTABLISHED
    return count
