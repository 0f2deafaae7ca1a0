"""PACS test helpers: tiny stage models, a real Orthanc with DICOMweb, and the dciodvfy validator.

Orthanc and dciodvfy are Debian packages (``scripts/setup.sh`` installs them): a machine without
them fails these tests with the install command, never skips them.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from test_predict import edited, stage_model

from pe_triage.predict import Triage

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "apt-get install -y orthanc orthanc-dicomweb dicom3tools (or run scripts/setup.sh as root)"
#: the Orthanc of the rejected-STOW test refuses every object from this institution (a Lua filter)
REJECTED_INSTITUTION = "REJECT-ME"
FILTER = f"""function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.InstitutionName ~= "{REJECTED_INSTITUTION}"
end
"""


def tiny_triage(root: Path, threshold: float) -> Triage:
    """Random tiny stage models (32 px crops); threshold 0 flags every slice, above 1 none."""
    pair = stage_model(root / "stage1", 1), stage_model(root / "stage2", 2)
    for path in pair:
        edited(path, path, threshold=threshold)
    return Triage.load(*pair)


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for the file (warnings are not errors)."""
    if shutil.which("dciodvfy") is None:
        pytest.fail(f"dciodvfy (Debian dicom3tools) is missing: {INSTALL}")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_orthanc(folder: Path, lua: str | None = None) -> tuple[subprocess.Popen, str]:
    """A real Orthanc with DICOMweb on free loopback ports, storing under ``folder``; (process, base URL)."""
    if shutil.which("Orthanc") is None or not ORTHANC_PLUGIN.is_file():
        pytest.fail(f"Orthanc with its DICOMweb plugin is needed for the PACS tests: {INSTALL}")
    folder.mkdir(parents=True, exist_ok=True)
    http = _free_port()
    config = {"Name": "pe-triage-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http, "DicomPort": _free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [str(ORTHANC_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    if lua:
        (folder / "filter.lua").write_text(lua)
        config["LuaScripts"] = [str(folder / "filter.lua")]
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    proc = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"Orthanc exited with {proc.returncode}: {(folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/system", timeout=2).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.3)
    proc.terminate()
    pytest.fail("Orthanc did not answer within 60 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def upload(url: str, paths: list[Path]) -> None:
    """Store files in Orthanc (its REST ``POST /instances``, as a modality would send them)."""
    for path in paths:
        response = requests.post(f"{url}/instances", data=path.read_bytes(), timeout=30)
        response.raise_for_status()
