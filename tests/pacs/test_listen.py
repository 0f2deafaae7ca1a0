"""``pe-triage listen``'s state machine on a fake clock: a study is triaged after its quiet period,
its results are sent once per model version (a retry resends the same objects), a restart resumes
from the spool, and a failing study is retried with back-off, then kept in failed/ with its reason."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dicomweb_client import DICOMwebClient
from factories import ct_slice, write, write_series
from pacs.test_study import finding
from pydicom import Dataset, dcmread

from pe_triage.config import Config, ConfigError, IngestConfig, ListenConfig, PacsConfig
from pe_triage.pacs import StowRejected, study_tag
from pe_triage.pacs.listen import FAILED, RESULTS, Listener, Model, Spool
from pe_triage.pacs.listen_scp import run_listener, sender
from pe_triage.predict import Triage

STUDY, PATIENT = "1.2.826.0.1.3680043.10.1234.77", "PAT-LISTEN"
TAG = study_tag(STUDY)
LISTEN = ListenConfig(allowed_calling_aes=("SCANNER",), destination_ae="PACS", destination_host="127.0.0.1",
                      quiet_s=30.0, retries=3, backoff_s=10.0)
PACS = PacsConfig(uid_root="1.2.826.0.1.3680043.10.1234.")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Destination:
    """A sender that keeps what it was sent; it refuses while ``refuse`` > 0 (counting down)."""

    def __init__(self, refuse: int = 0) -> None:
        self.received: list[Dataset] = []
        self.refuse = refuse
        self.offered: list[list[str]] = []

    def __call__(self, folder: Path) -> int:
        datasets = [dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        self.offered.append([str(ds.SOPInstanceUID) for ds in datasets])
        if self.refuse:
            self.refuse -= 1
            raise StowRejected("the test destination refused")
        self.received += datasets
        shutil.rmtree(folder)
        return len(datasets)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("listen-series"), 4, size=96, study=STUDY, series=f"{STUDY}.1",
                        patient=PATIENT)


def receive(spool: Spool, paths: list[Path]) -> None:
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        spool.receive(ds.StudyInstanceUID, ds.SOPInstanceUID, path.read_bytes())


def node(root: Path, triage: Triage, send: Destination, clock: Clock, version: str = "7",
         config: ListenConfig = LISTEN) -> Listener:
    model = Model(triage, "pe-triage", version)
    return Listener(Spool(root, clock), lambda: model, send, config=config, pacs=PACS, ingest=IngestConfig(workers=1))


def state(listener: Listener) -> dict:
    return dict(json.loads((listener.spool.root / TAG / "state.json").read_text()))


def test_a_study_is_triaged_after_its_quiet_period_and_sent_once(flagging: Triage, series: list[Path], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock, sent = Clock(), Destination()
    listener = node(tmp_path, flagging, sent, clock)
    receive(listener.spool, series[:2])
    clock.now = 20.0
    receive(listener.spool, series[2:])  # the quiet period starts again
    clock.now = 49.0
    listener.step()
    assert sent.received == [] and state(listener)["state"] == "received"
    clock.now = 50.0
    listener.step()
    sr, key = sent.received
    assert finding(sr) == "PE suspected" and key.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (sr.StudyInstanceUID, sr.PatientID) == (STUDY, PATIENT)
    assert state(listener) | {"sent_versions": ["7"], "state": "sent", "triage": "pe"} == state(listener)
    assert sorted(p.name for p in (tmp_path / TAG).iterdir()) == ["state.json"]  # no instance nor result left
    clock.now = 500.0
    listener.step()
    assert len(sent.received) == 2
    assert STUDY not in caplog.text and PATIENT not in caplog.text and f"{TAG}: triage pe" in caplog.text


def test_the_same_study_again_is_not_triaged_again_by_the_same_version(flagging: Triage, series: list[Path],
                                                                       tmp_path: Path) -> None:
    clock, sent = Clock(), Destination()
    listener = node(tmp_path, flagging, sent, clock)
    receive(listener.spool, series)
    clock.now = 30.0
    listener.step()
    receive(listener.spool, series)  # the PACS sends the study again
    clock.now = 60.0
    listener.step()
    assert len(sent.received) == 2 and state(listener)["state"] == "sent"
    assert not (tmp_path / TAG / "work").exists()
    newer = node(tmp_path, flagging, sent, clock, version="8")  # a new champion: its own results
    receive(newer.spool, series)
    clock.now = 90.0
    newer.step()
    assert len(sent.received) == 4 and state(newer)["sent_versions"] == ["7", "8"]
    assert len({str(ds.SOPInstanceUID) for ds in sent.received}) == 4


def test_a_retry_resends_the_same_objects_after_the_back_off(flagging: Triage, series: list[Path], tmp_path: Path) -> None:
    clock, sent = Clock(), Destination(refuse=1)
    listener = node(tmp_path, flagging, sent, clock)
    receive(listener.spool, series)
    clock.now = 30.0
    listener.step()
    assert state(listener) | {"state": "triaged", "attempts": 1} == state(listener)
    assert "refused" in state(listener)["error"]
    clock.now = 39.0  # first back-off: 10 s
    listener.step()
    assert len(sent.offered) == 1
    clock.now = 40.0
    listener.step()
    assert sent.offered[0] == sent.offered[1] == [str(ds.SOPInstanceUID) for ds in sent.received]
    assert state(listener)["attempts"] == 0 and state(listener)["state"] == "sent"


def test_a_restart_resumes_received_and_triaged_studies(flagging: Triage, series: list[Path], tmp_path: Path) -> None:
    clock, sent = Clock(), Destination(refuse=1)
    first = node(tmp_path, flagging, sent, clock)
    receive(first.spool, series)
    clock.now = 30.0
    first.step()  # triaged, the send refused: the node then stops
    built = sent.offered[0]
    restarted = node(tmp_path, Triage.__new__(Triage), sent, clock)  # an unusable model: a re-triage would fail
    clock.now = 59.0
    restarted.step()  # a restart waits a quiet period: the sender may still be sending
    assert len(sent.offered) == 1
    clock.now = 60.0
    restarted.step()
    assert [str(ds.SOPInstanceUID) for ds in sent.received] == built and state(restarted)["state"] == "sent"

    other = tmp_path / "second"
    receive(Spool(other, clock), series)  # received, then the node stopped before the quiet period ended
    resumed = node(other, flagging, sent, clock)
    clock.now = 90.0
    resumed.step()
    assert len(sent.received) == 4 and state(resumed)["state"] == "sent"


def test_a_failing_study_is_retried_with_back_off_then_kept_in_failed(flagging: Triage, series: list[Path], tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    clock, sent = Clock(), Destination(refuse=99)
    listener = node(tmp_path, flagging, sent, clock)
    receive(listener.spool, series)
    for now in (30.0, 40.0, 59.0, 60.0):  # back-offs 10 s, then 20 s; the third attempt is the last
        clock.now = now
        listener.step()
    assert len(sent.offered) == 3 and not (tmp_path / TAG).exists()
    kept = tmp_path / FAILED / TAG
    assert "StowRejected: the test destination refused" in (kept / "reason.txt").read_text()
    assert len(list((kept / "work").glob("*.dcm"))) == 4 and len(list((kept / RESULTS).glob("*.dcm"))) == 2
    assert f"{TAG}: failed after 3 attempt(s), moved to failed/{TAG}/" in caplog.text and STUDY not in caplog.text
    receive(listener.spool, series)  # sent again later: a fresh try, the failed copy stays
    clock.now = 100.0
    sent.refuse = 0
    listener.step()
    assert len(sent.received) == 2 and kept.is_dir()


def test_a_study_that_cannot_be_triaged_goes_to_failed_at_once(tmp_path: Path) -> None:
    clock, sent = Clock(), Destination()
    listener = node(tmp_path / "spool", Triage.__new__(Triage), sent, clock)
    mr = write(ct_slice(modality="MR", size=96, study=STUDY), tmp_path / "mr.dcm")
    receive(listener.spool, [mr])
    clock.now = 30.0
    listener.step()
    assert "no CT series" in (tmp_path / "spool" / FAILED / TAG / "reason.txt").read_text() and sent.offered == []


def test_nothing_is_attempted_while_no_model_is_loaded(series: list[Path], tmp_path: Path) -> None:
    clock, sent = Clock(), Destination()
    listener = Listener(Spool(tmp_path, clock), lambda: None, sent, config=LISTEN, pacs=PACS, ingest=IngestConfig())
    receive(listener.spool, series)
    clock.now = 1000.0
    listener.step()
    assert sent.offered == [] and state(listener)["attempts"] == 0 and listener.spool.pending(TAG)


@pytest.mark.parametrize(("listen", "message"), [
    (ListenConfig(destination_ae="PACS", destination_host="pacs"), "allowed_calling_aes is empty"),
    (ListenConfig(allowed_calling_aes=("SCANNER",)), "no destination"),
])
def test_an_open_or_destinationless_node_does_not_start(listen: ListenConfig, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        run_listener(lambda: None, Config(listen=listen), host="127.0.0.1", stop=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [{"ae_title": "A" * 17}, {"ae_title": " "}, {"port": 0}, {"retries": 0},
                                 {"quiet_s": 0}, {"stow_url": "http://pacs/dicom-web", "destination_host": "pacs"}])
def test_bad_listen_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError, match="listen"):
        ListenConfig(**bad)


def test_the_listen_command_refuses_an_open_node_before_loading_a_model(tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({"listen": {"destination_ae": "PACS", "destination_host": "127.0.0.1"}}))
    out = subprocess.run([sys.executable, "-m", "pe_triage.cli", "listen", "--model", "models:/pe-triage@champion",
                          "--config", str(config), "--tracking-uri", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "listen.allowed_calling_aes is empty" in out.stderr
    assert "loading" not in out.stderr


def test_results_go_back_by_stow_rs_when_configured(flagging: Triage, orthanc: str, tmp_path: Path) -> None:
    """``listen.stow_url``: the same loop, the results stored by STOW-RS in a real Orthanc, once."""
    study = "1.2.826.0.1.3680043.10.1234.78"
    paths = write_series(tmp_path / "study", 3, size=96, study=study, series=f"{study}.1")
    listen = ListenConfig(allowed_calling_aes=("SCANNER",), stow_url=f"{orthanc}/dicom-web")
    clock = Clock()
    model = Model(flagging, "pe-triage", "7")
    listener = Listener(Spool(tmp_path / "spool", clock), lambda: model, sender(Config(listen=listen, pacs=PACS)),
                        config=listen, pacs=PACS, ingest=IngestConfig(workers=1))
    for now in (0.0, 100.0):  # the study, then the same study again
        clock.now = now
        receive(listener.spool, paths)
        clock.now = now + 30.0
        listener.step()
    found = DICOMwebClient(f"{orthanc}/dicom-web").search_for_instances(study_instance_uid=study)
    assert sorted(i["00080060"]["Value"][0] for i in found) == ["OT", "SR"]
