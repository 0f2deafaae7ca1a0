"""One writer per site and dataset: two ingests of one site never both write, and a failed run leaves no staging."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pyarrow.dataset as pads
import pytest
from factories import ct_slice, pseudo, write

from pe_triage import schema as S
from pe_triage.cli import main
from pe_triage.config import IngestConfig
from pe_triage.ingest import ingest_site
from pe_triage.ingest import site as site_mod
from pe_triage.storage import Holder, Lock, LockBusy, LockLost, RowGroupWriter, location

SITE = "test-site"
SERIES = "1.2.3.4.5"
HALF = 6


def halves(root: Path) -> tuple[Path, Path]:
    """Two folders, each half of one series (slices 1 mm apart): the export of one scan, split in two."""
    for i in range(2 * HALF):
        folder = root / ("a" if i < HALF else "b")
        write(ct_slice(series=SERIES, sop=f"{SERIES}.{i + 1}", z=float(i), instance=2 * HALF - i), folder / f"IM{i:04d}.dcm")
    return root / "a", root / "b"


def run(src: Path, out: Path, config: IngestConfig = IngestConfig(workers=1)) -> dict[str, Any]:
    return ingest_site(SITE, str(src), str(out), pseudo=pseudo(SITE), config=config)


def stored(out: Path) -> list[dict[str, Any]]:
    table = pads.dataset(out / f"site={SITE}", format="parquet").to_table(columns=[S.SOP_UID, S.SLICE_INDEX, S.Z_MM])
    return sorted(table.to_pylist(), key=lambda r: r[S.SLICE_INDEX])


def staged_files(out: Path) -> list[Path]:
    return [p for p in (out / "_staging").rglob("*") if p.is_file()]


def start(name: str, fn: Callable[[], object], results: dict[str, object]) -> threading.Thread:
    """``fn`` in a thread called ``name``; its result, or the exception it raised, lands in ``results``."""

    def target() -> None:
        try:
            results[name] = fn()
        except BaseException as exc:  # handed to the test, which asserts on it
            results[name] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class Overlap:
    """Interleaves the ingests in threads ``first`` and ``second`` as two runs of a real site can be.

    ``at="plan"``: the first waits after reading the stored rows until the second has read them too, and
    the second waits after that until the first has committed (without a lock: both exit 0, and the later
    commit replaces the series with its half). ``at="commit"``: the first waits with its series staged
    until the second has read the stored rows. A wait gives up after ``patience`` seconds, which is what
    happens when a lock keeps the other run out.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: str, patience: float = 3.0) -> None:
        self.first_planned, self.second_planned, self.first_committed = (threading.Event() for _ in range(3))
        self.first_staged = threading.Event()  # the first run is at its commit, its series staged
        rows, commit = site_mod.existing_rows, site_mod._commit

        def existing_rows(*args: Any, **kwargs: Any) -> Any:
            found = rows(*args, **kwargs)
            name = threading.current_thread().name
            if name == "first":
                self.first_planned.set()
                if at == "plan":
                    self.second_planned.wait(patience)
            elif name == "second":
                self.second_planned.set()
                if at == "plan":
                    self.first_committed.wait(patience)
            return found

        def delayed_commit(*args: Any, **kwargs: Any) -> Any:
            first = threading.current_thread().name == "first"
            if first:
                self.first_staged.set()
            if first and at == "commit":
                self.second_planned.wait(patience)
            done = commit(*args, **kwargs)
            if first:
                self.first_committed.set()
            return done

        monkeypatch.setattr(site_mod, "existing_rows", existing_rows)
        monkeypatch.setattr(site_mod, "_commit", delayed_commit)


@pytest.fixture
def overlap(monkeypatch: pytest.MonkeyPatch) -> Iterator[Overlap]:
    """The first run holds with its series staged."""
    made = Overlap(monkeypatch, at="commit")
    yield made
    made.second_planned.set()  # never leave a first run blocked


def test_concurrent_ingests_of_two_halves_keep_every_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The issue's reproduction: the second half started 0.2 s after the first, both planning from the
    same state. Both must end well and the dataset must hold the whole series (the second run waits)."""
    Overlap(monkeypatch, at="plan")
    a, b = halves(tmp_path)
    out = tmp_path / "out"
    results: dict[str, object] = {}
    first = start("first", lambda: run(a, out), results)
    time.sleep(0.2)
    second = start("second", lambda: run(b, out), results)
    first.join(120)
    second.join(120)
    assert set(results) == {"first", "second"}
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    rows = stored(out)
    assert len(rows) == 2 * HALF
    assert [r[S.SLICE_INDEX] for r in rows] == list(range(2 * HALF))
    assert [r[S.Z_MM] for r in rows] == [float(i) for i in range(2 * HALF)]
    assert "waiting" in caplog.text


def test_second_ingest_refuses_without_touching_the_first(tmp_path: Path, overlap: Overlap) -> None:
    """Refusing mode (``lock_wait_s: 0``): the second run fails at once naming the holder, and the first
    run's staged series survive it."""
    a, b = halves(tmp_path)
    out = tmp_path / "out"
    results: dict[str, object] = {}
    first = start("first", lambda: run(a, out), results)
    assert overlap.first_staged.wait(60)
    staged = staged_files(out)
    assert staged  # what the refused run must leave alone
    with pytest.raises(LockBusy) as refused:
        run(b, out, IngestConfig(workers=1, lock_wait_s=0))
    message = str(refused.value)
    assert f"site={SITE}" in message and "pid" in message and "\n" not in message
    assert str(tmp_path) not in message  # no source or output path: they may name a patient
    assert staged_files(out) == staged
    overlap.second_planned.set()
    first.join(120)
    assert isinstance(results["first"], dict)
    assert len(stored(out)) == HALF
    run(b, out)  # the refused half, once the first run is done
    assert len(stored(out)) == 2 * HALF


def test_cli_concurrent_run_ends_in_one_line_and_exit_2(tmp_path: Path, overlap: Overlap,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    a, b = halves(tmp_path)
    out = tmp_path / "out"
    config = tmp_path / "ingest.yaml"
    config.write_text("ingest:\n  lock_wait_s: 0\n")
    results: dict[str, object] = {}
    first = start("first", lambda: run(a, out), results)
    assert overlap.first_planned.wait(60)
    rc = main(["ingest", "--site", SITE, "--source", str(b), "--out", str(out), "--demo", "--workers", "1",
               "--config", str(config)])
    overlap.second_planned.set()
    first.join(120)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "held by another run" in errors[0]
    assert len(stored(out)) == HALF


def test_disk_full_ends_in_one_line_and_leaves_no_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC while a series is staged (a real Parquet file half written): exit 2 with one line, the
    half-written staging removed, nothing committed."""
    a, _ = halves(tmp_path)
    out = tmp_path / "out"
    original = RowGroupWriter.write

    def disk_full(self: RowGroupWriter, table: Any) -> None:
        original(self, table)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RowGroupWriter, "write", disk_full)
    rc = main(["ingest", "--site", SITE, "--source", str(a), "--out", str(out), "--demo", "--workers", "1"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2
    assert len(errors) == 1 and "no space left" in errors[0] and "\n" not in errors[0]
    assert str(a) not in errors[0]
    assert staged_files(out) == []
    assert not (out / f"site={SITE}").exists()
    monkeypatch.undo()
    assert run(a, out)["files"]["ingested"] == HALF  # once there is room, the same run goes through


# -- the lock itself, on a local folder and on S3 (moto server) ----------------------------------

NAME = f"site={SITE}"
#: a process that takes the lock: "hold" keeps it until killed; "rounds" takes it three times, logging
#: entry and exit to a file, once a "go" file exists (so that all processes contend at once)
HOLDER = """
import os, sys, time
from pathlib import Path
from pe_triage.storage import Lock, location
uri, mode, log = sys.argv[1:4]
if mode == "hold":
    Lock(location(uri), "site=test-site", ttl_s=60, wait_s=0).acquire()
    print("held", flush=True)
    time.sleep(600)
print("ready", flush=True)
while not Path(log + ".go").exists():
    time.sleep(0.01)
for _ in range(3):
    with Lock(location(uri), "site=test-site", ttl_s=60, wait_s=120, poll_s=0.02):
        with open(log, "a") as f:
            f.write(f"in {os.getpid()}\\n")
        time.sleep(0.05)
        with open(log, "a") as f:
            f.write(f"out {os.getpid()}\\n")
"""


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A dataset URI: a local folder, or a prefix of a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "dataset")
    request.getfixturevalue("s3_endpoint")
    bucket = f"lock-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/datasets/slices"


def lock(uri: str, wait_s: float = 0, ttl_s: float = 60) -> Lock:
    return Lock(location(uri), NAME, ttl_s=ttl_s, wait_s=wait_s, poll_s=0.02)


def holder(uri: str, mode: str, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLDER, uri, mode, str(log)], stdout=subprocess.PIPE, text=True)


def alternates(entries: list[str]) -> bool:
    """Every entry is followed by the exit of the same holder before anyone else enters."""
    pairs = [entries[i : i + 2] for i in range(0, len(entries), 2)]
    return all(len(p) == 2 and p[0].startswith("in ") and p[1] == "out " + p[0][3:] for p in pairs)


def test_lock_excludes_threads(where: str) -> None:
    entries: list[str] = []

    def rounds(name: str) -> None:
        for _ in range(3):
            with lock(where, wait_s=120):
                entries.append(f"in {name}")
                time.sleep(0.01)
                entries.append(f"out {name}")

    threads = [threading.Thread(target=rounds, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(entries) == 2 * 3 * 6
    assert alternates(entries), entries


def test_lock_excludes_processes(where: str, tmp_path: Path) -> None:
    log = tmp_path / "sections.log"
    procs = [holder(where, "rounds", log) for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        (tmp_path / "sections.log.go").touch()
        assert [p.wait(120) for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            p.kill()
    entries = log.read_text().splitlines()
    assert len(entries) == 2 * 3 * 3 and len({e.split()[1] for e in entries}) == 3
    assert alternates(entries), entries


def test_lock_of_a_killed_holder_is_recovered_at_once(where: str, tmp_path: Path) -> None:
    """kill -9 leaves the record behind; the next run takes the lock without waiting (the kernel dropped
    the flock; on S3 the holder's pid is gone on this machine) and without waiting out the TTL."""
    proc = holder(where, "hold", tmp_path / "unused")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match=f"pid {proc.pid} on host"):
            lock(where).acquire()
    finally:
        proc.kill()
        proc.wait(30)
    with lock(where) as taken:
        taken.check()


def test_lock_is_released_when_the_block_fails(where: str) -> None:
    with pytest.raises(ValueError, match="inside"), lock(where):
        raise ValueError("inside")
    with lock(where):
        pass


def test_s3_lock_of_another_machine_is_taken_over_once_expired(s3_endpoint: str) -> None:
    """A record from another machine is waited out while renewed; once older than the TTL, eight runs
    try to take it over at once and exactly one wins."""
    uri = f"s3://takeover-{uuid.uuid4().hex[:8]}/slices"
    boto3.client("s3").create_bucket(Bucket=uri[5:].split("/")[0])
    key = {"Bucket": uri[5:].split("/")[0], "Key": f"slices/_locks/{NAME}.lock"}
    other = Holder("elsewhere", 4242, "another-machine", "t0", time.time() - 30, time.time())
    boto3.client("s3").put_object(Body=other.body(), **key)
    with pytest.raises(LockBusy, match="pid 4242 on host elsewhere"):
        lock(uri, ttl_s=10).acquire()
    expired = dataclasses.replace(other, heartbeat=time.time() - 11)
    boto3.client("s3").put_object(Body=expired.body(), **key)
    results: dict[str, object] = {}
    barrier = threading.Barrier(8)

    def take(name: str) -> object:
        mine = lock(uri, ttl_s=10)
        barrier.wait()
        mine.acquire()
        return mine

    threads = [start(f"r{i}", lambda i=i: take(f"r{i}"), results) for i in range(8)]  # type: ignore[misc]
    for t in threads:
        t.join(60)
    winners = [r for r in results.values() if isinstance(r, Lock)]
    assert len(winners) == 1, results
    assert all(isinstance(r, LockBusy) and "elsewhere" not in str(r) for r in results.values() if r not in winners)
    record = json.loads(boto3.client("s3").get_object(**key)["Body"].read())
    assert record["token"] == winners[0]._me.token and record["pid"] == os.getpid()
    winners[0].release()


def test_s3_lock_is_renewed_and_a_taken_over_holder_does_not_commit(s3_endpoint: str) -> None:
    uri = f"s3://renew-{uuid.uuid4().hex[:8]}/slices"
    bucket = uri[5:].split("/")[0]
    boto3.client("s3").create_bucket(Bucket=bucket)
    key = {"Bucket": bucket, "Key": f"slices/_locks/{NAME}.lock"}
    held = lock(uri, ttl_s=2)
    held.acquire()
    time.sleep(4.5)  # over twice the TTL: only renewals keep it
    with pytest.raises(LockBusy):
        lock(uri, ttl_s=2).acquire()
    held.check()
    thief = Holder("elsewhere", 4242, "another-machine", "thief", time.time(), time.time())
    boto3.client("s3").put_object(Body=thief.body(), **key)  # what a take-over by another run writes
    with pytest.raises(LockLost):
        held.check()
    held.release()
    assert json.loads(boto3.client("s3").get_object(**key)["Body"].read())["token"] == "thief"


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_ingest_after_a_killed_ingest_recovers(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """kill -9 of an ingest with its series staged leaves its lock and staging behind; the next run goes
    through at once (``lock_wait_s: 0``) and ingests everything."""
    if kind == "s3":
        request.getfixturevalue("s3_endpoint")
        boto3.client("s3").create_bucket(Bucket="killed")
    out = str(tmp_path / "out") if kind == "local" else "s3://killed/slices"
    a, _ = halves(tmp_path)
    marker = tmp_path / "staged"
    script = KILLED.format(site=SITE)
    proc = subprocess.Popen([sys.executable, "-c", script, str(a), out, str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the ingest to kill did not get to its commit"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(30)
    dst = location(out)
    assert dst.exists(dst.join("_locks", f"{NAME}.lock")) and dst.exists(dst.join("_staging", NAME))
    report = ingest_site(SITE, str(a), out, pseudo=pseudo(SITE), config=IngestConfig(workers=1, lock_wait_s=0))
    assert report["files"]["ingested"] == HALF
    assert not dst.exists(dst.join("_staging", NAME))


#: an ingest that stops for good once its series are staged (then killed by the test)
KILLED = """
import sys, time
from pathlib import Path
from pe_triage.config import IngestConfig
from pe_triage.dicom import DEMO_KEY, Pseudonymizer
from pe_triage.ingest import ingest_site, site

def hang(*args, **kwargs):
    Path(sys.argv[3]).write_text("staged")
    time.sleep(600)

site._commit = hang
ingest_site("{site}", sys.argv[1], sys.argv[2], pseudo=Pseudonymizer(DEMO_KEY, "{site}"), config=IngestConfig(workers=1))
"""
