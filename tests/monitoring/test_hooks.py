"""Every triage path writes one record per study: ``pe-triage predict`` (the command), ``serve``'s
``/v1/triage`` and ``/invocations``, and ``listen``; none of them carries the study's identifiers."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

from fastapi.testclient import TestClient
from monitoring.conftest import PATIENT, STUDY
from pacs.test_listen import LISTEN, PACS, Clock, Destination, receive

from pe_triage import schema as S
from pe_triage.config import IngestConfig, MonitorConfig, ServeConfig
from pe_triage.monitoring import MonitorStore
from pe_triage.pacs.listen import Listener, Model, Spool
from pe_triage.predict import Triage
from pe_triage.registry.cli import add_commands
from pe_triage.registry.pyfunc import input_example
from pe_triage.registry.serve import ModelHolder
from pe_triage.registry.serve_http import create_app


def no_identifier(store: Path) -> None:
    for path in store.rglob("*.parquet"):
        assert STUDY.encode() not in path.read_bytes() and PATIENT.encode() not in path.read_bytes()


def test_predict_writes_a_record_per_study(composite: Path, study: list[Path], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"monitor:\n  store: {tmp_path / 'store'}\n  site: west\n")
    parser = argparse.ArgumentParser(prog="pe-triage")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", "--model", str(composite), "--dicom", str(study[0].parent),
                              "--config", str(config), "--out", str(tmp_path / "report.json")])
    assert args.func(args) == 0
    (row,) = MonitorStore(str(tmp_path / "store")).read().to_dict("records")
    assert (row["site"], row["source"], row["model"], row["n_slices"]) == ("west", "predict", "local", 4)
    assert row["study_triage"] == json.loads((tmp_path / "report.json").read_text())["studies"][0]["triage"]
    no_identifier(tmp_path / "store")


def test_serve_writes_a_record_per_triage(composite: Path, study: list[Path], tmp_path: Path) -> None:
    holder = ModelHolder(str(composite), device="cpu")
    assert holder.refresh()
    store = tmp_path / "store"
    client = TestClient(create_app(holder, ServeConfig(), IngestConfig(), MonitorConfig(store=str(store), site="east")))
    files = [("file", (f"{n}.dcm", p.read_bytes(), "application/dicom")) for n, p in enumerate(study)]
    assert client.post("/v1/triage", files=files).status_code == 200
    example = input_example().assign(hu=lambda f: [base64.b64encode(b).decode() for b in f["hu"]])
    body = {"dataframe_split": json.loads(example.to_json(orient="split", index=False))}
    assert client.post("/invocations", json=body).status_code == 200
    frame = MonitorStore(str(store)).read().sort_values("source")
    assert frame["source"].tolist() == ["invocations", "serve"] and set(frame["site"]) == {"east"}
    assert frame[S.KERNEL].isna().tolist() == [True, False]  # HU slices carry no acquisition fields
    assert frame[S.KERNEL].iloc[1] == "FC52" and frame["n_slices"].tolist() == [1, 4]
    no_identifier(store)


def test_listen_writes_a_record_per_study(flagging: Triage, study: list[Path], tmp_path: Path) -> None:
    clock, sent, store = Clock(), Destination(), tmp_path / "store"
    listener = Listener(Spool(tmp_path / "spool", clock), lambda: Model(flagging, "pe-triage", "7"), sent, config=LISTEN,
                        pacs=PACS, ingest=IngestConfig(workers=1), monitor=MonitorConfig(store=str(store), site="south"))
    receive(listener.spool, study)
    clock.now = 1000.0
    listener.step()
    assert sent.received  # the study went through
    (row,) = MonitorStore(str(store)).read().to_dict("records")
    assert (row["site"], row["source"], row["model"], row["model_version"]) == ("south", "listen", "pe-triage", "7")
    assert (row["study_triage"], row[S.MANUFACTURER]) == ("pe", "ACME MEDICAL")
    no_identifier(store)
